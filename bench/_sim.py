"""The routing simulation's engines and clock (``bench/route_sim.py`` compares policies on it).

Simulated time, discrete events; nothing here waits on the wall clock.

:class:`SimEngine` is a vLLM-like engine with a prefix cache of ``capacity_blocks`` blocks:

- a request is queued (``waiting``) until a running slot is free and its blocks fit:
  the prompt's cached prefix (its *hit*) is pinned, and room for every other block of the
  prompt and the reply is reserved at admission, evicting unpinned blocks least recently
  used first (a ``BlockRemoved`` event);
- prefill is one FIFO compute queue per engine: ``uncached prompt tokens /
  prefill_tokens_per_s``; then the prompt's new blocks are stored (one ``BlockStored``);
- decode takes ``reply tokens / decode_tokens_per_s`` (sequences decode side by side);
  at the end each full block of generated tokens is stored (one 1-block ``BlockStored``
  each, as vLLM emits them) and the sequence's blocks are freed tail first, so a chain's
  tail is evicted before its root.

Block hashes are the engines' own: a prefix chain seeded with ``ENGINE_HASH_SEED`` (not the
index's seed) mixed with a per-engine salt, so no two engines, and no engine and the index,
share hashes; the index must rebuild prefix hashes from the events' tokens.

:func:`simulate` runs a workload: each turn arrives, ``choose`` picks an engine from the
prompt and every engine's :class:`~edgellm.kvindex.router.PodLoad` (running, waiting, KV
use), the engine serves it, and the events it emits at simulated time t are handed to
``deliver`` at t + ``lag_s`` (``lag_s``: engine step, publisher, transport and indexing,
together). Before each decision ``sync()`` is called, so a real pipeline behind
``deliver`` can finish applying what has arrived by then, and nothing later.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from _workload import Conversation

from edgellm.kvindex.api import PodMatch
from edgellm.kvindex.hashing import block_bytes, chain
from edgellm.kvindex.router import PodLoad
from edgellm.protocol.kv_events import BlockRemoved, BlockStored, KVEvent

BS = 16
MODEL = "sim-model"
CONTEXT = (MODEL, -1)
ENGINE_HASH_SEED = 0x51A5_0F_E6_1E_5EED


@dataclass(frozen=True)
class EngineConfig:
    """One engine's size and speed (the same for every engine of a run)."""

    capacity_blocks: int = 6000
    max_running: int = 64
    prefill_tokens_per_s: float = 10_000.0
    decode_tokens_per_s: float = 50.0


@dataclass(eq=False, slots=True)
class Request:
    """One turn of one conversation."""

    chat: int
    """Index of the conversation in the workload."""
    conversation: Conversation
    hashes: list[int]
    """The engines' (unsalted) hash of every full block of the conversation."""
    turn: int
    arrival_s: float
    prompt_blocks: int = 0
    seq_blocks: int = 0
    """Full blocks of prompt + reply."""
    hit_blocks: int = 0
    """Prompt blocks the engine had cached at admission."""
    prefill_done_s: float = 0.0

    def __post_init__(self) -> None:
        self.prompt_blocks = self.prompt_tokens // BS
        self.seq_blocks = self.conversation.reply_ends[self.turn] // BS

    @property
    def prompt_tokens(self) -> int:
        return self.conversation.prompt_ends[self.turn]

    @property
    def reply_tokens(self) -> int:
        return self.conversation.reply_ends[self.turn] - self.prompt_tokens

    @property
    def prompt(self) -> list[int]:
        return self.conversation.tokens[:self.prompt_tokens]


def conversation_hashes(conversation: Conversation) -> list[int]:
    """The engines' hash chain over every full block of ``conversation`` (unsalted)."""
    tokens = conversation.tokens
    n = len(tokens) // BS
    return chain(block_bytes(tokens, BS, n), BS, ENGINE_HASH_SEED)


class SimEngine:
    """One engine: its queue, its running requests and its prefix cache (module docstring)."""

    def __init__(self, pod_key: str, config: EngineConfig, salt: int) -> None:
        self.pod_key = pod_key
        self.config = config
        self.salt = salt
        self.blocks: dict[int, int] = {}
        """Cached block (unsalted hash) -> requests using it."""
        self.free: dict[int, None] = {}
        """Cached blocks no request uses, least recently used first: the eviction order."""
        self.reserved = 0
        """Blocks admitted requests will store; ``len(blocks) + reserved <= capacity``."""
        self.waiting: deque[Request] = deque()
        self.running = 0
        self.prefill_free_s = 0.0
        """When the engine's prefill queue is next free."""

    def cached_blocks(self, hashes: Sequence[int], n: int) -> int:
        """How many of the first ``n`` blocks of ``hashes`` are cached, from the start."""
        blocks = self.blocks
        k = 0
        while k < n and hashes[k] in blocks:
            k += 1
        return k

    def load(self) -> PodLoad:
        used = len(self.blocks) - len(self.free) + self.reserved
        return PodLoad(self.running, len(self.waiting), used / self.config.capacity_blocks)

    def submit(self, request: Request) -> None:
        if request.seq_blocks > self.config.capacity_blocks:
            raise ValueError(f"{request.seq_blocks} blocks never fit in "
                             f"{self.config.capacity_blocks}")
        self.waiting.append(request)

    def admit(self, now: float) -> list[tuple[Request, list[KVEvent]]]:
        """Admit queued requests, first come first served, while they fit; each with the
        events of its admission (evictions). Sets ``hit_blocks`` and ``prefill_done_s``."""
        out = []
        cfg = self.config
        blocks, free = self.blocks, self.free
        while self.waiting and self.running < cfg.max_running:
            request = self.waiting[0]
            hashes = request.hashes
            hit = self.cached_blocks(hashes, request.prompt_blocks)
            unpinned_hits = sum(1 for h in hashes[:hit] if blocks[h] == 0)
            new = request.seq_blocks - hit
            pinned = len(blocks) - len(free)
            if pinned + unpinned_hits + self.reserved + new > cfg.capacity_blocks:
                break
            self.waiting.popleft()
            for h in hashes[:hit]:
                self._pin(h)
            evicted = []
            while len(blocks) + self.reserved + new > cfg.capacity_blocks:
                victim = next(iter(free))
                del free[victim], blocks[victim]
                evicted.append(victim ^ self.salt)
            self.reserved += new
            self.running += 1
            request.hit_blocks = hit
            start = max(now, self.prefill_free_s)
            uncached = request.prompt_tokens - hit * BS
            self.prefill_free_s = start + uncached / cfg.prefill_tokens_per_s
            request.prefill_done_s = self.prefill_free_s
            out.append((request, [BlockRemoved(evicted, "GPU")] if evicted else []))
        return out

    def decode_s(self, request: Request) -> float:
        return request.reply_tokens / self.config.decode_tokens_per_s

    def prefill_done(self, request: Request) -> list[KVEvent]:
        """The prompt is computed: its blocks past the hit are stored."""
        return self._store(request, request.hit_blocks, request.prompt_blocks, one_event=True)

    def finish(self, request: Request) -> list[KVEvent]:
        """The reply is done: its full blocks are stored, the sequence's blocks freed."""
        events = self._store(request, request.prompt_blocks, request.seq_blocks, one_event=False)
        blocks, free = self.blocks, self.free
        for h in reversed(request.hashes[:request.seq_blocks]):  # the root freed last
            count = blocks[h] - 1
            blocks[h] = count
            if count == 0:
                free[h] = None
        self.running -= 1
        return events

    def _pin(self, h: int) -> None:
        count = self.blocks[h]
        if count == 0:
            del self.free[h]
        self.blocks[h] = count + 1

    def _store(self, request: Request, lo: int, hi: int, one_event: bool) -> list[KVEvent]:
        """Store blocks ``lo:hi`` of the request (each uses a reserved slot; one another
        request stored meanwhile is pinned instead) and describe the new ones."""
        hashes, salt, tokens = request.hashes, self.salt, request.conversation.tokens
        runs: list[tuple[int, int]] = []
        for i in range(lo, hi):
            h = hashes[i]
            self.reserved -= 1
            if h in self.blocks:
                self._pin(h)
                continue
            self.blocks[h] = 1
            if runs and runs[-1][1] == i and one_event:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return [BlockStored([hashes[i] ^ salt for i in range(a, b)],
                            hashes[a - 1] ^ salt if a else None,
                            tokens[a * BS:b * BS], BS, None, "GPU", None)
                for a, b in runs]


class CacheOracle:
    """A ``PrefixIndex``-shaped view of the engines' caches themselves (``match_prefix``
    only): what an index would answer with no event lag and no limits."""

    def __init__(self, engines: dict[str, SimEngine]) -> None:
        self.engines = engines

    def match_prefix(self, context, token_ids, ready_pods=None) -> dict[str, PodMatch]:
        n = len(token_ids) // BS
        hashes = chain(block_bytes(token_ids, BS, n), BS, ENGINE_HASH_SEED)
        out = {}
        for pod in (ready_pods if ready_pods is not None else self.engines):
            k = self.engines[pod].cached_blocks(hashes, n)
            if k:
                out[pod] = PodMatch(k, 100.0 * k / n)
        return out


@dataclass
class RunResult:
    """What one run of one policy did."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    held_tokens: int = 0
    """Prompt tokens that some engine's cache held (from the start) when the request came."""
    requests_per_engine: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    ttft_s: list[float] = field(default_factory=list)
    max_in_flight: int = 0
    end_s: float = 0.0

    def as_dict(self) -> dict[str, object]:
        counts = list(self.requests_per_engine.values())
        ttft = sorted(self.ttft_s)
        return {
            "hit_rate": round(self.cached_tokens / self.prompt_tokens, 4),
            "held_at_arrival": round(self.held_tokens / self.prompt_tokens, 4),
            "max_over_mean_load": round(max(counts) * len(counts) / sum(counts), 3),
            "requests_per_engine": counts,
            "max_in_flight": self.max_in_flight,
            "ttft_p50_s": round(ttft[len(ttft) // 2], 3),
            "ttft_p99_s": round(ttft[min(len(ttft) - 1, len(ttft) * 99 // 100)], 3),
            "simulated_s": round(self.end_s, 1),
            **({"reasons": dict(sorted(self.reasons.items()))} if self.reasons else {}),
        }


Chooser = Callable[[Request, dict[str, PodLoad]], str]
"""``choose(request, loads) -> pod_key``; may add to the run's ``reasons``."""

_DELIVER, _PREFILL_DONE, _FINISH, _ARRIVE = range(4)  # order of events at one instant


def simulate(conversations: Sequence[Conversation], engines: dict[str, SimEngine],
             choose: Chooser, *, lag_s: float = 0.0,
             deliver: Callable[[str, list[KVEvent]], None] | None = None,
             sync: Callable[[], None] | None = None,
             result: RunResult | None = None) -> RunResult:
    """Serve every turn of ``conversations`` on ``engines`` (see the module docstring);
    the figures go to ``result`` (a new one by default), which is returned."""
    result = result if result is not None else RunResult()
    result.requests_per_engine = {p: 0 for p in engines}
    hashes = [conversation_hashes(c) for c in conversations]
    clock: list[tuple[float, int, int, object]] = []
    order = 0

    def at(t: float, kind: int, what: object) -> None:
        nonlocal order
        order += 1
        heapq.heappush(clock, (t, kind, order, what))

    def emit(t: float, engine: SimEngine, events: list[KVEvent]) -> None:
        if events and deliver is not None:
            at(t + lag_s, _DELIVER, (engine.pod_key, events))

    def admit(t: float, engine: SimEngine) -> None:
        for request, events in engine.admit(t):
            emit(t, engine, events)
            at(request.prefill_done_s, _PREFILL_DONE, (engine, request))
            result.cached_tokens += request.hit_blocks * BS

    for c, conversation in enumerate(conversations):
        at(conversation.start_s, _ARRIVE, (c, 0))
    while clock:
        t, kind, _, what = heapq.heappop(clock)
        if kind == _DELIVER:
            deliver(*what)
        elif kind == _ARRIVE:
            c, turn = what
            request = Request(c, conversations[c], hashes[c], turn, t)
            if sync is not None:
                sync()
            loads = {p: e.load() for p, e in engines.items()}
            result.max_in_flight = max(result.max_in_flight,
                                       max(l.running + l.waiting for l in loads.values()))
            result.held_tokens += BS * max(e.cached_blocks(request.hashes, request.prompt_blocks)
                                           for e in engines.values())
            pod = choose(request, loads)
            result.requests_per_engine[pod] += 1
            result.prompt_tokens += request.prompt_tokens
            engines[pod].submit(request)
            admit(t, engines[pod])
        elif kind == _PREFILL_DONE:
            engine, request = what
            emit(t, engine, engine.prefill_done(request))
            result.ttft_s.append(t - request.arrival_s)
            at(t + engine.decode_s(request), _FINISH, (engine, request))
        else:
            engine, request = what
            emit(t, engine, engine.finish(request))
            conversation = request.conversation
            if request.turn + 1 < conversation.turns:
                at(t + conversation.think_s[request.turn], _ARRIVE,
                   (request.chat, request.turn + 1))
            admit(t, engine)
        result.end_s = t
    return result


def make_engines(n: int, config: EngineConfig, seed: int) -> dict[str, SimEngine]:
    """``n`` empty engines ``sim/engine-0`` ..., their hash salts drawn from ``seed``."""
    rng = random.Random(seed)
    return {f"sim/engine-{k}": SimEngine(f"sim/engine-{k}", config, rng.getrandbits(64))
            for k in range(n)}
