"""The ``llm`` unit: a real model on the CPU behind the StackFlow protocol (docs/llm-unit.md).

One unit process serves one model with one :class:`~edgellm.engine.LLMEngine`: every task
shares the engine's block prefix cache, whose stores and evictions are published as vLLM
KV events (pod ``<box>/<unit>``, topic ``kv@<pod>@<model>``, ports leased from the unit
manager) and announced where ``edgellm kv-events --unit-registry`` and the gateway find them.
This module only adapts the protocol: settings and request shapes are parsed in
:mod:`~edgellm.units.llm_requests`, the manager-side presence kept by
:mod:`~edgellm.units.llm_presence`.

Threads: a task's worker parses an inference and hands it to the engine; the engine's step
thread produces the outputs and emits them on the task's channel (handed to the worker);
``pause`` (control thread) and ``exit`` (worker) end the task's generations in flight with
their terminal piece at once. Each generation answers with its own request id, so several
may be in flight on one task.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from edgellm.comm.curve import CurveServer
from edgellm.engine import (EngineBusy, EngineConfig, EngineRequestError, LLMEngine,
                            ModelLoadError, RequestOutput)  # fmt: skip
from edgellm.engine.sampling import SamplingParams
from edgellm.kvevents.publisher import KVEventPublisher, PublisherConfig
from edgellm.models.catalog import ModelSource
from edgellm.models.tokenizer import TokenizerError
from edgellm.protocol.errors import ErrorCode
from edgellm.unit import NONE, Task, Unit, UnitConfig, UnitError
from edgellm.units.llm_presence import UnitPresence
from edgellm.units.llm_requests import (StructuredRequest, TaskSettings, is_structured,
                                        parse_setup, parse_structured, request_sampling)  # fmt: skip

log = logging.getLogger(__name__)

STREAM_FORMAT = "llm.utf-8.stream"
TEXT_FORMAT = "llm.utf-8"


@dataclass(frozen=True)
class LlmUnitConfig:
    """What the llm unit serves and where it publishes its KV events.

    ``event_host`` is the address the KV event publisher binds (loopback by default: open it
    only for a gateway on another box); ``event_ports`` fixes ``(pub, replay)`` ports instead
    of leasing them from the unit manager; ``event_curve``: CURVE keys of the publisher (only
    the subscribers it names get in, encrypted).
    """

    model: ModelSource
    engine: EngineConfig = field(default_factory=EngineConfig)
    event_host: str = "127.0.0.1"
    event_ports: tuple[int, int] | None = None
    event_curve: CurveServer | None = field(default=None, repr=False)


class _Generation:
    """One inference in flight: who asked, and what has been said so far."""

    __slots__ = ("engine_id", "request_id", "push_url", "structured", "index", "parts",
                 "closed", "prompt_tokens", "cached_tokens", "completion_tokens")  # fmt: skip

    def __init__(self, engine_id: str, request_id: str, push_url: str, structured: bool):
        self.engine_id = engine_id
        self.request_id = request_id
        self.push_url = push_url
        self.structured = structured
        self.index = 0
        self.parts: list[str] = []
        self.closed = False
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0

    def usage(self, finish_reason: str) -> dict[str, Any]:
        return {"finish_reason": finish_reason, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "completion_tokens": self.completion_tokens}  # fmt: skip


class _TaskState:
    def __init__(self, settings: TaskSettings):
        self.settings = settings
        self.lock = threading.Lock()
        self.generations: dict[str, _Generation] = {}


def _endpoint(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"tcp://{host}:{port or '*'}"


def _port_of(endpoint: str | None) -> int:
    return int(endpoint.rpartition(":")[2]) if endpoint else 0


class LlmUnit(Unit):
    """See the module docstring."""

    EXTRA_ACTIONS = ("stats", "tokenize")

    def __init__(self, config: UnitConfig, llm: LlmUnitConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.llm = llm
        self.model = llm.model
        self.engine: LLMEngine | None = None
        self.publisher: KVEventPublisher | None = None
        self.presence = UnitPresence(config.name, self._new_sys_client)
        self.pod_key = ""
        self.load_error: str | None = None
        """Why the model could not be loaded; the unit then serves, refusing setups (-5)."""
        self._ids = itertools.count()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "LlmUnit":
        """Load the model, bind the KV event publisher, serve, then publish the unit's mode and
        endpoint. A model that cannot be loaded leaves the unit serving without it: every
        setup is answered -5 with the reason (:attr:`load_error`). Raises what else failed
        (``OSError``, a live unit of that name...), leaving nothing."""
        try:
            return self._start()
        except ModelLoadError as exc:
            self.load_error = str(exc)
            log.error("llm unit %s: %s; serving without a model", self.name, exc)
            self.engine = self.publisher = None
            super().start()
            return self

    def _start(self) -> "LlmUnit":
        box = self.presence.box_name()
        self.pod_key = f"{box}/{self.name}"
        try:
            self.publisher = self._start_publisher()
            self.engine = LLMEngine(self.model, self.llm.engine, on_events=self.publisher.publish)
            self.engine.start()
            super().start()
        except BaseException:
            self._stop_engine()
            self.presence.withdraw()
            raise
        self.presence.publish([self.mode_info()], self._announcement())
        log.info("llm unit %s serves %s as pod %s (KV events %s, replay %s)", self.name,
                 self.model.name, self.pod_key, self.publisher.pub_endpoint,
                 self.publisher.replay_endpoint)  # fmt: skip
        return self

    def _start_publisher(self) -> KVEventPublisher:
        """The KV event publisher on the fixed ports, else on two leased from the unit manager;
        if those are taken on this host after all (another manager's pool, another program),
        on ports the OS picks."""
        leased = not self.llm.event_ports
        ports = self.llm.event_ports or tuple(self.presence.lease_ports(2)) or (0, 0)
        while True:
            publisher = KVEventPublisher(PublisherConfig(
                pub_endpoint=_endpoint(self.llm.event_host, ports[0]),
                replay_endpoint=_endpoint(self.llm.event_host, ports[1]),
                topic=f"kv@{self.pod_key}@{self.model.name}", curve=self.llm.event_curve,
            ))  # fmt: skip
            try:
                return publisher.start()
            except OSError as exc:
                if not leased or ports == (0, 0) or exc.errno != errno.EADDRINUSE:
                    raise
                log.warning("leased KV event ports %s are in use on this host (%s); letting "
                            "the OS pick", ports, exc)  # fmt: skip
                self.presence.release_ports()
                ports = (0, 0)

    def stop(self) -> None:
        self.presence.withdraw()
        super().stop()  # exits every task: their generations end with a terminal piece
        self._stop_engine()

    def manager_up(self) -> None:
        """A unit manager came up: publish the models and the KV event endpoint there now."""
        self.presence.refresh()

    def _stop_engine(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self.publisher is not None:
            self.publisher.stop()  # after the engine: its last events still go out

    def mode_info(self) -> dict[str, Any]:
        assert self.engine is not None and self.publisher is not None
        return {
            "mode": self.model.name, "type": "llm", "unit": self.name,
            "capabilities": ["text_generation", "chat"],
            "input_type": [TEXT_FORMAT, STREAM_FORMAT], "output_type": [TEXT_FORMAT, STREAM_FORMAT],
            "max_context": self.engine.max_model_len, "block_size": self.engine.config.block_size,
            "kv_events": {
                "pod_key": self.pod_key, "host": self._announced_host(),
                "pub_port": _port_of(self.publisher.pub_endpoint),
                "router_port": _port_of(self.publisher.replay_endpoint),
                "topic": f"kv@{self.pod_key}@{self.model.name}",
            },
        }  # fmt: skip

    def _announced_host(self) -> str:
        host = self.llm.event_host
        return "127.0.0.1" if host in ("", "*", "0.0.0.0") else ("::1" if host == "::" else host)

    def _announcement(self) -> dict[str, Any]:
        info = self.mode_info()["kv_events"]
        return {"ip": info["host"], "model": self.model.name, "pub_port": info["pub_port"],
                "router_port": info["router_port"], "pod_key": self.pod_key}  # fmt: skip

    # -- tasks -------------------------------------------------------------------------------

    def setup_task(self, task: Task, object_: str, data: Any) -> None:
        if self.engine is None:
            settings = parse_setup(data, {}, {self.model.name: self.load_error or "not loaded"})
        else:
            settings = parse_setup(data, {self.model.name: self.engine.max_model_len}, {})
        task.state["llm"] = _TaskState(settings)
        log.info("task %s: %s, %s, max_token_len %d", task.work_id, settings.model,
                 task.config.response_format, settings.max_token_len)  # fmt: skip

    def task_info(self, task: Task) -> Any:
        info = task.config.info()
        state: _TaskState | None = task.state.get("llm")
        if state is not None:
            info.update(state.settings.info())
        return info

    def inference_data(self, task: Task, object_: Any, data: Any) -> None:
        if not is_structured(data):
            super().inference_data(task, object_, data)  # text: gathered, then inference()
            return
        state = self._state(task)
        request = parse_structured(data)
        ids = self._prompt_ids(request, state.settings)
        params = request_sampling(state.settings, request.overrides)
        self._submit(task, state, ids, params, request.cache_salt, structured=True)

    def inference(self, task: Task, text: str) -> None:
        state = self._state(task)
        messages = [{"role": "user", "content": text}]
        if state.settings.system_prompt:
            messages.insert(0, {"role": "system", "content": state.settings.system_prompt})
        ids = self._encode_chat(messages)
        self._submit(task, state, ids, state.settings.sampling, None, structured=False)

    def pause_task(self, task: Task, data: Any) -> None:
        task.paused = True
        self._close_generations(task)

    def work_task(self, task: Task, data: Any) -> None:
        if not task.paused:
            raise UnitError(ErrorCode.ALREADY_WORKING)
        task.paused = False

    def exit_task(self, task: Task) -> None:
        self._close_generations(task)

    # -- the unit's own actions ------------------------------------------------------------

    def unit_action(self, action: str, work_id: str, data: Any) -> tuple[str, Any]:
        if self.engine is None:
            raise UnitError(ErrorCode.MODEL_LOADING, self.load_error or "no model")
        if action == "stats":
            s = self.engine.stats()
            return f"{self.name}.stats", {self.model.name: {
                "num_requests_running": s.num_requests_running,
                "num_requests_waiting": s.num_requests_waiting,
                "kv_cache_usage_perc": round(s.kv_cache_usage_perc, 6),
                "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits,
                "num_blocks": s.num_blocks, "num_cached_blocks": s.num_cached_blocks,
                "block_size": s.block_size, "preemptions": s.preemptions,
                "prompt_tokens": s.prompt_tokens, "generation_tokens": s.generation_tokens,
            }}  # fmt: skip
        if action == "tokenize":
            if not isinstance(data, dict):
                raise UnitError(ErrorCode.JSON_FORMAT, "tokenize data must be an object")
            model = data.get("model", self.model.name)
            if model != self.model.name:
                raise UnitError(ErrorCode.MODEL_LOADING, f"unknown model {model!r}")
            request = parse_structured({k: v for k, v in data.items() if k != "model"})
            settings = TaskSettings(self.model.name, 1, "", SamplingParams())
            ids = self._prompt_ids(request, settings)
            return f"{self.name}.tokenize", {"tokens": ids, "count": len(ids), "model": model}
        raise UnitError(ErrorCode.NO_UNIT_ACTION, action)

    # -- generations ---------------------------------------------------------------------------

    def _state(self, task: Task) -> _TaskState:
        state = task.state.get("llm")
        if state is None:  # a setup that failed leaves no task, so this is a bug if reached
            raise UnitError(ErrorCode.NOT_INITIALISED, "task has no model")
        return state

    def _encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        assert self.engine is not None
        try:
            return self.engine.tokenizer.encode_chat(messages)
        except TokenizerError as exc:
            raise UnitError(ErrorCode.JSON_FORMAT, str(exc)) from None

    def _prompt_ids(self, request: StructuredRequest, settings: TaskSettings) -> list[int]:
        assert self.engine is not None
        if request.messages is not None:
            messages = request.messages
            has_system = any(isinstance(m, dict) and m.get("role") == "system" for m in messages)
            if settings.system_prompt and not has_system:
                messages = [{"role": "system", "content": settings.system_prompt}, *messages]
            return self._encode_chat(messages)
        if request.prompt is not None:
            return self.engine.tokenizer.encode(request.prompt)
        return list(request.prompt_token_ids or [])

    def _submit(self, task: Task, state: _TaskState, ids: list[int], params: SamplingParams,
                cache_salt: str | None, *, structured: bool) -> None:  # fmt: skip
        assert self.engine is not None
        gen = _Generation(f"{task.work_id}#{next(self._ids)}", task.request_id, task.push_url,
                          structured)  # fmt: skip
        with state.lock:
            state.generations[gen.engine_id] = gen
        try:
            self.engine.add_request(gen.engine_id, ids, params,
                                    lambda out: self._on_output(task, state, gen, out),
                                    cache_salt=cache_salt)  # fmt: skip
        except EngineBusy as exc:
            with state.lock:
                state.generations.pop(gen.engine_id, None)
            raise UnitError(ErrorCode.TASK_FULL, str(exc)) from None
        except EngineRequestError as exc:
            with state.lock:
                state.generations.pop(gen.engine_id, None)
            raise UnitError(ErrorCode.CONFIG, str(exc)) from None
        log.info("%s request %s: %d prompt tokens, max %d new", task.work_id, gen.request_id,
                 len(ids), params.max_tokens)  # fmt: skip

    def _on_output(self, task: Task, state: _TaskState, gen: _Generation, out: RequestOutput) -> None:
        """Engine thread: turn one output into pieces on the task's channel. Under the task's
        lock, so a pause or exit never lets a piece follow the terminal one."""
        with state.lock:
            if gen.closed:
                return  # ended by pause/exit: its terminal piece was sent then
            if out.finished:
                gen.closed = True
                state.generations.pop(gen.engine_id, None)
            gen.prompt_tokens, gen.cached_tokens = out.prompt_tokens, out.cached_tokens
            gen.completion_tokens = out.completion_tokens
            if out.finished and out.finish_reason == "error":
                self._send_error(task, gen, UnitError(ErrorCode.MODEL_RUN, out.error or ""))
            elif task.config.stream:
                if out.text:
                    self._send(task, gen, {"delta": out.text, "finish": False, "index": gen.index})
                    gen.index += 1
                if out.finished:
                    self._send_final(task, gen, out.finish_reason or "stop")
            else:
                gen.parts.append(out.text)
                if out.finished:
                    self._send_final(task, gen, out.finish_reason or "stop")
        if out.finished:
            log.log(logging.ERROR if out.finish_reason == "error" else logging.INFO,
                    "%s request %s: %s after %d tokens (%d of %d prompt tokens cached)%s",
                    task.work_id, gen.request_id, out.finish_reason, out.completion_tokens,
                    out.cached_tokens, out.prompt_tokens,
                    f": {out.error}" if out.error else "")  # fmt: skip

    def _send_final(self, task: Task, gen: _Generation, reason: str) -> None:
        if task.config.stream:
            self._send(task, gen, {"delta": "", "finish": True, "index": gen.index,
                                   **gen.usage(reason)})  # fmt: skip
        elif gen.structured:
            self._send(task, gen, {"text": "".join(gen.parts), "finish": True, **gen.usage(reason)})
        else:
            self._send(task, gen, "".join(gen.parts))

    def _send(self, task: Task, gen: _Generation, data: Any) -> None:
        payload = task.envelope(task.config.response_format, data, request_id=gen.request_id)
        task.channel.emit(payload, gen.push_url if task.config.enoutput else None)

    def _send_error(self, task: Task, gen: _Generation, error: UnitError) -> None:
        if gen.push_url:
            payload = task.envelope(NONE, NONE, int(error.code), error.message,
                                    request_id=gen.request_id)  # fmt: skip
            task.channel.push(gen.push_url, payload)

    def _close_generations(self, task: Task) -> None:
        """End every generation of ``task`` now: its terminal piece (``abort``), then the
        engine forgets it."""
        state: _TaskState | None = task.state.get("llm")
        if state is None or self.engine is None:
            return
        with state.lock:
            gens = list(state.generations.values())
            state.generations.clear()
            for gen in gens:
                gen.closed = True
                self._send_final(task, gen, "abort")
        for gen in gens:
            self.engine.abort(gen.engine_id)
            log.info("%s request %s: aborted after %d tokens", task.work_id, gen.request_id,
                     gen.completion_tokens)  # fmt: skip
