"""The engine: one model, one block prefix cache, one thread stepping every request.

    engine = LLMEngine(source, EngineConfig(...), on_events=publisher.publish).start()
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=64), on_output)
    ...
    engine.stop()

``start()`` loads the model (converting a GGUF file once), sizes the block pool from the byte
budget, checks the architecture runs through the paged attention, and starts the step
thread. Each step: schedule (:mod:`~edgellm.engine.scheduler`), one forward pass
(:mod:`~edgellm.engine.model_runner`), sample, extend and cache full blocks
(:mod:`~edgellm.engine.block_pool`), publish that step's KV events in one batch, then hand
each request its output. Callbacks run on the step thread: keep them quick (hand the output
to your own thread).

Thread-safety: :meth:`LLMEngine.add_request`, :meth:`abort`, :meth:`reset_prefix_cache`,
:meth:`stats` and :meth:`stop` may be called from any thread. Bad requests are refused at
once with :class:`EngineRequestError` (or :class:`EngineBusy` when the queue is full); once
accepted, a request always gets exactly one final output (``finished`` true), even if the
model fails (``finish_reason`` ``"error"``) or the engine stops (``"abort"``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from edgellm.engine import loader
from edgellm.engine.block_hash import BlockHasher, none_hash
from edgellm.engine.block_pool import BlockPool
from edgellm.engine.config import EngineConfig
from edgellm.engine.kv_cache import KVCache
from edgellm.engine.model_runner import ModelRunner
from edgellm.engine.request import OutputHandler, Request, RequestOutput, Status
from edgellm.engine.sampler import generator_for, sample
from edgellm.engine.sampling import SamplingParams
from edgellm.engine.scheduler import Scheduler
from edgellm.models.catalog import ModelSource
from edgellm.protocol.kv_event_types import KVEvent

log = logging.getLogger(__name__)

EventSink = Callable[[list[KVEvent]], object]


class EngineRequestError(ValueError):
    """A request the engine cannot take (empty, too long for the context or the KV pool,
    duplicate id, engine not running)."""


class EngineBusy(EngineRequestError):
    """The waiting queue is full; try again later."""


@dataclass(frozen=True)
class EngineStats:
    """vLLM's load signals and the prefix cache's counters, as of the last step."""

    model: str
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage_perc: float = 0.0
    """Share of KV blocks referenced by requests, 0..1 (vLLM's gauge of that name)."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Of those, tokens whose KV came from the cache."""
    num_blocks: int = 0
    num_cached_blocks: int = 0
    block_size: int = 16
    evictions: int = 0
    preemptions: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class LLMEngine:
    """See the module docstring."""

    def __init__(self, source: ModelSource, config: EngineConfig | None = None, *,
                 on_events: EventSink | None = None, lora_id: int | None = None):  # fmt: skip
        self.source = source
        self.config = config or EngineConfig()
        self.on_events = on_events
        self.lora_id = lora_id
        self.loaded: loader.LoadedModel | None = None
        self.pool: BlockPool | None = None
        self.kv: KVCache | None = None
        self.max_model_len = 0
        self._scheduler: Scheduler | None = None
        self._runner: ModelRunner | None = None
        self._root = none_hash()
        self._rng = torch.Generator().manual_seed(int.from_bytes(self._root[:8], "big") >> 1)
        self._generators: dict[str, torch.Generator] = {}
        self._live: dict[str, Request] = {}
        self._inbox: deque[tuple] = deque()
        self._cond = threading.Condition()
        self._state = "new"
        self._thread: threading.Thread | None = None
        self._stats = EngineStats(source.name, block_size=self.config.block_size)
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._steps = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> "LLMEngine":
        """Load the model and start stepping, on the engine's own thread; raises what loading
        raised (:class:`~edgellm.engine.loader.ModelLoadError`) or ``TimeoutError``.

        Every PyTorch call of the engine happens on that one thread: OpenMP gives each
        calling thread its own worker team, and two teams on a small machine make both slow
        (their workers stop spinning and sleep between operations)."""
        if self._state != "new":
            raise RuntimeError(f"engine already {self._state}")
        self._state = "starting"
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                self._load()
            except BaseException as exc:
                failure.append(exc)
                self._state = "stopped"
                started.set()
                return
            with self._cond:
                if self._state == "starting":  # not stopped meanwhile
                    self._state = "running"
            started.set()
            self._run()

        self._thread = threading.Thread(target=main, name=f"engine:{self.source.name}", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            self.stop()
            raise TimeoutError(f"engine {self.source.name} did not start in {timeout}s")
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    def _load(self) -> None:
        cfg = self.config
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)  # OpenMP: per calling thread, so here
        loaded = loader.load(self.source, cfg.dtype, cfg.cache_root)
        dtype = loader.TORCH_DTYPES[cfg.dtype]
        per_block = KVCache.bytes_per_block(loaded.num_layers, loaded.num_kv_heads,
                                            loaded.head_dim, cfg.block_size, dtype)  # fmt: skip
        num_blocks = cfg.kv_cache_bytes // per_block
        if num_blocks < 2:
            raise loader.ModelLoadError(
                f"a KV budget of {cfg.kv_cache_bytes} bytes holds {num_blocks} blocks of "
                f"{per_block} bytes; at least 2 are needed"
            )
        self.loaded = loaded
        self.kv = KVCache(loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, num_blocks,
                          cfg.block_size, dtype)  # fmt: skip
        self.pool = BlockPool(num_blocks, cfg.block_size)
        self.max_model_len = min(loaded.max_position_embeddings,
                                 cfg.max_model_len or loaded.max_position_embeddings)  # fmt: skip
        self._scheduler = Scheduler(self.pool, prefill_chunk=cfg.prefill_chunk,
                                    max_num_seqs=cfg.max_num_seqs)  # fmt: skip
        self._runner = ModelRunner(loaded, self.kv)
        self._warm_up()
        self._stats = self._snapshot()
        log.info("engine %s: %d KV blocks of %d tokens (%.1f MiB, %d bytes a token)",
                 self.source.name, num_blocks, cfg.block_size, self.kv.nbytes / 2**20,
                 per_block // cfg.block_size)  # fmt: skip

    def _warm_up(self) -> None:
        """One forward over a block's worth of tokens: checks the architecture uses the paged
        attention (:class:`ModelLoadError` if not) and warms the kernels."""
        assert self._runner is not None and self.pool is not None
        n = min(self.config.block_size, self.max_model_len - 1)
        probe = Request("warm-up", [0] * n, SamplingParams(max_tokens=1), lambda _: None,
                        self.tokenizer.detokenizer(), BlockHasher(self.pool.block_size, self._root),
                        frozenset(), 0.0)  # fmt: skip
        probe.blocks = self.pool.allocate(1)
        try:
            self._runner.forward([probe], [n], [0])
        finally:
            self.pool.free(probe.blocks)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every request with ``"abort"`` and stop the thread; idempotent."""
        with self._cond:
            if self._state not in ("running", "starting"):
                self._state = "stopped"
                return
            self._state = "stopping"
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._state = "stopped"

    def __enter__(self) -> "LLMEngine":
        return self.start() if self._state == "new" else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def tokenizer(self):
        if self.loaded is None:
            raise RuntimeError("engine not started")
        return self.loaded.tokenizer

    @property
    def running(self) -> bool:
        return self._state == "running"

    # -- requests (any thread) -----------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                    on_output: OutputHandler, *, cache_salt: str | None = None) -> None:  # fmt: skip
        """Queue a request; raises :class:`EngineRequestError` / :class:`EngineBusy`."""
        if self._state != "running" or self.pool is None:
            raise EngineRequestError("engine is not running")
        if not prompt_ids:
            raise EngineRequestError("the prompt is empty")
        vocab = self.tokenizer.vocab_size
        for t in prompt_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < max(vocab, 1):
                raise EngineRequestError(f"token id {t!r} is outside the vocabulary (0..{vocab - 1})")
        n = len(prompt_ids)
        if n + 1 > self.max_model_len:
            raise EngineRequestError(
                f"the prompt has {n} tokens; the context holds {self.max_model_len} with at "
                f"least one to generate"
            )
        if -(-(n + 1) // self.pool.block_size) > self.pool.num_blocks:
            raise EngineRequestError(
                f"the prompt needs {-(-(n + 1) // self.pool.block_size)} KV blocks; the pool "
                f"has {self.pool.num_blocks}"
            )
        hasher = BlockHasher(self.pool.block_size, self._root, cache_salt)
        request = Request(request_id, prompt_ids, params, on_output, self.tokenizer.detokenizer(),
                          hasher, self.loaded.eos_token_ids, time.monotonic())  # fmt: skip
        with self._cond:
            if self._state != "running":
                raise EngineRequestError("engine is not running")
            if request_id in self._live:
                raise EngineRequestError(f"request id {request_id!r} is already in the engine")
            waiting = self._stats.num_requests_waiting + sum(1 for m in self._inbox if m[0] == "add")
            if waiting >= self.config.max_waiting + self.config.max_num_seqs:
                raise EngineBusy(f"{waiting} requests wait for {self.source.name}")
            self._live[request_id] = request
            self._inbox.append(("add", request))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """End a request now (``finish_reason`` ``"abort"``); unknown ids are ignored."""
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify()

    def reset_prefix_cache(self) -> Future:
        """Drop every cached block (``AllBlocksCleared``) once no request holds blocks; the
        future's result says whether it happened."""
        future: Future = Future()
        with self._cond:
            if self._state != "running":
                future.set_result(False)
                return future
            self._inbox.append(("reset", future))
            self._cond.notify()
        return future

    def stats(self) -> EngineStats:
        return self._stats

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 timeout: float | None = None) -> list[list[RequestOutput]]:  # fmt: skip
        """Run ``prompts`` (token ids) concurrently and wait: every output of each, in order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        outs: list[list[RequestOutput]] = [[] for _ in prompts]
        done = threading.Semaphore(0)

        def collect(i: int) -> OutputHandler:
            def on_output(out: RequestOutput) -> None:
                outs[i].append(out)
                if out.finished:
                    done.release()
            return on_output

        base = f"gen-{id(outs)}"
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            self.add_request(f"{base}-{i}", prompt, p, collect(i))
        for _ in prompts:
            if not done.acquire(timeout=timeout):
                raise TimeoutError("generation did not finish in time")
        return outs

    # -- the step thread ---------------------------------------------------------------------

    def _run(self) -> None:
        scheduler = self._scheduler
        assert scheduler is not None
        try:
            while True:
                with self._cond:
                    while not self._inbox and not scheduler.has_work() and self._state == "running":
                        self._cond.wait()
                    inbox = list(self._inbox)
                    self._inbox.clear()
                    stopping = self._state != "running"
                outputs = self._take_inbox(inbox)
                if stopping:
                    self._deliver(outputs + self._abort_all())
                    return
                outputs.extend(self._step())
                self._stats = self._snapshot()
                self._deliver(outputs)
        except BaseException:
            log.exception("engine %s: step thread failed", self.source.name)
            self._deliver(self._abort_all("error"))
            raise
        finally:
            with self._cond:
                self._state = "stopped"
                for kind, item in self._inbox:
                    if kind == "reset":
                        item.set_result(False)
                self._inbox.clear()

    def _take_inbox(self, inbox: list[tuple]) -> list[tuple[Request, RequestOutput]]:
        scheduler = self._scheduler
        assert scheduler is not None and self.pool is not None
        outputs = []
        for kind, item in inbox:
            if kind == "add":
                self._generators[item.request_id] = generator_for(item.params.seed, self._rng)
                scheduler.add(item)
            elif kind == "abort":
                request = self._live.get(item)
                if request is not None and request.status is not Status.FINISHED:
                    scheduler.finish(request, "abort")
                    outputs.append(self._final(request))
            elif kind == "reset":
                item.set_result(self.pool.reset())
                self._publish()
        return outputs

    def _step(self) -> list[tuple[Request, RequestOutput]]:
        scheduler, runner, pool = self._scheduler, self._runner, self.pool
        assert scheduler is not None and runner is not None and pool is not None
        batch = scheduler.schedule()
        outputs = [self._final(r) for r in batch.finished]
        if not batch:
            self._publish()
            return outputs
        requests, num_new = batch.requests, batch.num_new
        rows = [i for i, (r, n) in enumerate(zip(requests, num_new)) if r.num_computed + n == r.num_tokens]
        try:
            logits = runner.forward(requests, num_new, rows)
        except loader.ModelLoadError:
            raise
        except Exception as exc:  # the model failed on this batch: fail its requests, go on
            log.exception("engine %s: forward failed for %d requests", self.source.name, len(requests))
            for r in requests:
                scheduler.finish(r, "error", f"{type(exc).__name__}: {exc}")
                outputs.append(self._final(r))
            self._publish()
            return outputs
        self._steps += 1
        for r, n in zip(requests, num_new):
            r.num_computed += n
        sampled = [requests[i] for i in rows]
        tokens = sample(logits, [r.params for r in sampled],
                        [self._generators.get(r.request_id, self._rng) for r in sampled])  # fmt: skip
        self._prompt_tokens += sum(max(0, min(r.num_computed, r.num_prompt) - (r.num_computed - n))
                                   for r, n in zip(requests, num_new))  # fmt: skip
        for r, token in zip(sampled, tokens):
            r.append(token, self.max_model_len)
        self._generation_tokens += len(sampled)
        bs = pool.block_size
        for r in requests:
            full = min(r.num_computed // bs, len(r.block_hashes))
            if full > r.num_cached_blocks:
                pool.cache_full(r.blocks, r.num_cached_blocks, full, r.block_hashes, r.token_ids,
                                self.lora_id, private=r.hasher.salt is not None)  # fmt: skip
                r.num_cached_blocks = full
        for r in requests:
            if r.finish_reason is not None and r.status is not Status.FINISHED:
                scheduler.finish(r, r.finish_reason)
                outputs.append(self._final(r))
            else:
                out = r.take_output()
                if out is not None:
                    outputs.append((r, out))
        self._publish()
        return outputs

    def _final(self, request: Request) -> tuple[Request, RequestOutput]:
        self._live.pop(request.request_id, None)
        self._generators.pop(request.request_id, None)
        out = request.take_output()
        assert out is not None and out.finished
        return request, out

    def _abort_all(self, reason: str = "abort") -> list[tuple[Request, RequestOutput]]:
        outputs = []
        scheduler = self._scheduler
        for request in list(self._live.values()):
            if scheduler is not None and request.status is not Status.FINISHED:
                scheduler.finish(request, reason)
            elif request.status is not Status.FINISHED:
                request.finish(reason)
            outputs.append(self._final(request))
        self._publish()
        return outputs

    def _publish(self) -> None:
        if self.pool is None:
            return
        events = self.pool.take_events()
        if events and self.on_events is not None:
            try:
                self.on_events(events)
            except Exception:
                log.exception("engine %s: publishing %d KV events failed", self.source.name, len(events))

    def _deliver(self, outputs: list[tuple[Request, RequestOutput]]) -> None:
        for request, out in outputs:
            try:
                request.on_output(out)
            except Exception:
                log.exception("engine %s: output handler of %s failed", self.source.name,
                              request.request_id)  # fmt: skip

    def _snapshot(self) -> EngineStats:
        scheduler, pool = self._scheduler, self.pool
        assert scheduler is not None and pool is not None
        return EngineStats(
            model=self.source.name,
            num_requests_running=len(scheduler.running),
            num_requests_waiting=len(scheduler.waiting),
            kv_cache_usage_perc=pool.usage,
            prefix_cache_queries=pool.query_tokens,
            prefix_cache_hits=pool.hit_tokens,
            num_blocks=pool.num_blocks,
            num_cached_blocks=pool.num_cached,
            block_size=pool.block_size,
            evictions=pool.evictions,
            preemptions=scheduler.preemptions,
            steps=self._steps,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
        )
