"""The routing simulation: engines with real LRU block caches, a shared-prefix workload,
and the policies compared by ``bench/route_sim.py`` (and its test).

- :class:`SimEngine`: a vLLM-like prefix cache of ``capacity`` blocks. Engine block hashes
  are its own (seeded at random per engine, as vLLM's are); a prompt's cached prefix is the
  run of its blocks already in the cache. New blocks evict the least recently used ones
  (a finished sequence is touched tail first, so its tail goes before its root, as vLLM
  frees blocks). Each request yields the events vLLM would publish: BlockRemoved for the
  evicted blocks, one BlockStored for the new prompt blocks (parent: the last cached one),
  one 1-block BlockStored per full block of generated tokens.
- the workload: conversations with a system prompt drawn (Zipf) from a few shared ones,
  several turns each; turn k's prompt is the system prompt, every earlier turn (user
  message and the reply) and the new user message. Arrivals and think times are simulated
  (a discrete-event clock), so "running" counts overlapping requests per engine.
- policies: ``cache-aware`` (the :class:`~edgellm.kvindex.router.Router` on the prefix index
  fed by the real event pipeline), ``oracle`` (the same router on the engines' caches read
  directly), ``round-robin``, ``random``.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from edgellm.kvindex.api import PodMatch
from edgellm.kvindex.hashing import block_bytes, chain
from edgellm.kvindex.router import PodLoad, Router
from edgellm.protocol.kv_events import BlockRemoved, BlockStored

BS = 16
MODEL = "sim-model"
CONTEXT = (MODEL, -1)


@dataclass(frozen=True)
class WorkloadConfig:
    conversations: int = 400
    system_prompts: int = 8
    system_tokens: tuple[int, int] = (200, 600)
    turns: tuple[int, int] = (5, 12)
    user_tokens: tuple[int, int] = (50, 400)
    reply_tokens: tuple[int, int] = (150, 600)
    window_s: float = 200.0
    think_s: float = 5.0
    prefill_tokens_per_s: float = 10_000.0
    decode_tokens_per_s: float = 50.0
    seed: int = 1


@dataclass
class Conversation:
    system: list[int]
    users: list[list[int]]
    replies: list[list[int]]
    history: list[int] = field(default_factory=list)

    def prompt(self, turn: int) -> list[int]:
        if turn == 0:
            self.history = list(self.system)
        return self.history + self.users[turn]

    def finish(self, turn: int) -> None:
        self.history = self.history + self.users[turn] + self.replies[turn]


def make_conversations(cfg: WorkloadConfig) -> list[Conversation]:
    rng = random.Random(cfg.seed)
    vocab = range(300, 128_000)
    systems = [rng.choices(vocab, k=rng.randint(*cfg.system_tokens))
               for _ in range(cfg.system_prompts)]
    weights = [1 / (k + 1) for k in range(cfg.system_prompts)]  # Zipf popularity
    out = []
    for _ in range(cfg.conversations):
        n = rng.randint(*cfg.turns)
        out.append(Conversation(
            rng.choices(systems, weights)[0],
            [rng.choices(vocab, k=rng.randint(*cfg.user_tokens)) for _ in range(n)],
            [rng.choices(vocab, k=rng.randint(*cfg.reply_tokens)) for _ in range(n)]))
    return out


class SimEngine:
    """One engine's prefix cache: engine hash -> None, least recently used first."""

    def __init__(self, pod_key: str, capacity: int, seed: int) -> None:
        self.pod_key = pod_key
        self.capacity = capacity
        self.seed = seed
        self.cache: dict[int, None] = {}
        self.finish_times: list[float] = []
        self.requests = 0

    def hashes(self, tokens: Sequence[int]) -> list[int]:
        n = len(tokens) // BS
        return chain(block_bytes(tokens, BS, n), BS, self.seed)

    def cached_blocks(self, tokens: Sequence[int]) -> int:
        n = 0
        cache = self.cache
        for h in self.hashes(tokens):
            if h not in cache:
                break
            n += 1
        return n

    def running(self, now: float) -> int:
        while self.finish_times and self.finish_times[0] <= now:
            heapq.heappop(self.finish_times)
        return len(self.finish_times)

    def serve(self, prompt: list[int], reply: list[int]) -> tuple[int, list]:
        """Process one request; returns (cached prompt tokens, events to publish)."""
        self.requests += 1
        cache = self.cache
        full = prompt + reply
        seq_hashes = self.hashes(full)
        n_prompt = len(prompt) // BS
        hit = 0
        while hit < n_prompt and seq_hashes[hit] in cache:
            hit += 1
        for h in seq_hashes[:hit]:  # in use: most recent while the request runs
            del cache[h]
            cache[h] = None
        events: list = []
        evicted: list[int] = []

        def allocate(h: int) -> None:
            while len(cache) >= self.capacity:
                victim = next(iter(cache))
                del cache[victim]
                evicted.append(victim)
            cache[h] = None

        new = seq_hashes[hit:n_prompt]
        for h in new:
            allocate(h)
        if evicted:
            events.append(BlockRemoved(list(evicted), "GPU"))
            evicted.clear()
        if new:
            parent = seq_hashes[hit - 1] if hit else None
            events.append(BlockStored(new, parent, full[hit * BS:n_prompt * BS], BS,
                                      None, "GPU", None))
        for i in range(n_prompt, len(seq_hashes)):  # decode: one event per full block
            allocate(seq_hashes[i])
            if evicted:
                events.append(BlockRemoved(list(evicted), "GPU"))
                evicted.clear()
            events.append(BlockStored([seq_hashes[i]], seq_hashes[i - 1] if i else None,
                                      full[i * BS:(i + 1) * BS], BS, None, "GPU", None))
        for h in reversed(seq_hashes):  # freed tail first: the root stays longest
            if h in cache:
                del cache[h]
                cache[h] = None
        return hit * BS, events


class CacheOracle:
    """A PrefixIndex-shaped view of the engines' caches themselves (``match_prefix`` only)."""

    def __init__(self, engines: dict[str, SimEngine]) -> None:
        self.engines = engines

    def match_prefix(self, context, token_ids, ready_pods=None) -> dict[str, PodMatch]:
        n = len(token_ids) // BS
        out = {}
        for pod in (ready_pods if ready_pods is not None else self.engines):
            k = self.engines[pod].cached_blocks(token_ids)
            if k:
                out[pod] = PodMatch(k, 100.0 * k / n)
        return out


@dataclass
class PolicyResult:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    requests_per_engine: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    max_running: int = 0

    def as_dict(self) -> dict[str, object]:
        counts = list(self.requests_per_engine.values())
        mean = sum(counts) / len(counts)
        return {
            "hit_rate": round(self.cached_tokens / self.prompt_tokens, 4),
            "max_over_mean_load": round(max(counts) / mean, 3),
            "requests_per_engine": counts,
            "max_running": self.max_running,
            **({"reasons": dict(sorted(self.reasons.items()))} if self.reasons else {}),
        }


Chooser = Callable[[list[int], dict[str, PodLoad], int], str]


def simulate(cfg: WorkloadConfig, engines: dict[str, SimEngine], choose: Chooser,
             publish: Callable[[SimEngine, list], None] | None = None,
             result: PolicyResult | None = None) -> PolicyResult:
    """Run the workload once: each arrival is routed by ``choose(prompt, loads, i)``, served
    by the chosen engine, and its events handed to ``publish`` (before the next arrival)."""
    rng = random.Random(cfg.seed + 1)
    conversations = make_conversations(cfg)
    result = result or PolicyResult()
    result.requests_per_engine = {p: 0 for p in engines}
    arrivals = [(rng.uniform(0, cfg.window_s), c, 0) for c in range(len(conversations))]
    heapq.heapify(arrivals)
    i = 0
    while arrivals:
        now, c, turn = heapq.heappop(arrivals)
        conv = conversations[c]
        prompt = conv.prompt(turn)
        reply = conv.replies[turn]
        loads = {p: PodLoad(running=e.running(now)) for p, e in engines.items()}
        result.max_running = max(result.max_running, max(l.running for l in loads.values()))
        pod = choose(prompt, loads, i)
        i += 1
        engine = engines[pod]
        cached, events = engine.serve(prompt, reply)
        if publish is not None:
            publish(engine, events)
        result.prompt_tokens += len(prompt)
        result.cached_tokens += cached
        result.requests_per_engine[pod] += 1
        done = now + (len(prompt) - cached) / cfg.prefill_tokens_per_s \
            + len(reply) / cfg.decode_tokens_per_s
        heapq.heappush(engine.finish_times, done)
        conv.finish(turn)
        if turn + 1 < len(conv.users):
            heapq.heappush(arrivals, (done + rng.expovariate(1 / cfg.think_s), c, turn + 1))
    return result


def make_engines(n: int, capacity: int, seed: int) -> dict[str, SimEngine]:
    rng = random.Random(seed)
    return {f"sim/engine-{k}": SimEngine(f"sim/engine-{k}", capacity, rng.getrandbits(64))
            for k in range(n)}


def router_chooser(router: Router, result: PolicyResult) -> Chooser:
    def choose(prompt: list[int], loads: dict[str, PodLoad], i: int) -> str:
        decision = router.route(CONTEXT, prompt, loads)
        result.reasons[decision.reason] = result.reasons.get(decision.reason, 0) + 1
        return decision.pod_key
    return choose


def round_robin(pods: Iterable[str]) -> Chooser:
    order = sorted(pods)
    return lambda prompt, loads, i: order[i % len(order)]


def random_choice(pods: Iterable[str], seed: int) -> Chooser:
    order = sorted(pods)
    rng = random.Random(seed)
    return lambda prompt, loads, i: rng.choice(order)
