"""Choosing a backend for one request: AIBrix's routing strategies, picked per request with
its ``routing-strategy`` header (the gateway's default otherwise).

- ``prefix-cache``: the KV index's router (:class:`edgellm.kvindex.router.Router`, AIBrix's
  prefix-cache policy by default): the backend already caching the longest prefix of the
  prompt's exact token ids, unless load is too uneven. Needs the prompt's token ids and an
  index; without them it falls back to ``least-request`` (reason ``no-prompt-tokens`` /
  ``no-index``).
- ``least-request``: fewest requests in flight, then fewest waiting, then the key.
- ``round-robin``: the next backend of the model, in key order.
- ``random``: uniform.

A request with a ``cache_salt`` is never routed by the index under ``prefix-cache``: the
index holds every tenant's token prefixes, and where one lies (the ``target-pod`` of the
answer) must not tell another tenant anything. It goes to its salt's backend by rendezvous
hashing instead (reason ``cache-salt``), so one tenant's turns still meet their own cache,
unless loads differ by more than the router's imbalance threshold (then the least loaded).

A backend's load is the larger of what this gateway has in flight there and what the engine
last reported (running + waiting), so requests of other gateways count too, and a stale
report never hides this gateway's own.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from edgellm.gateway.backend import Backend, EngineLoad
from edgellm.kvindex.api import NO_LORA, IndexInputError, PrefixIndex
from edgellm.kvindex.router import PodLoad, Router, RouterConfig

STRATEGIES = ("prefix-cache", "least-request", "round-robin", "random")
HEADER = "routing-strategy"


@dataclass(frozen=True)
class Candidate:
    """A backend that could take the request, with its cache's index key and load."""

    backend: Backend
    index_key: str
    load: PodLoad


@dataclass(frozen=True)
class Choice:
    backend: Backend
    strategy: str
    reason: str
    matched_blocks: int = 0
    prompt_blocks: int = 0


def pod_load(in_flight: int, engine: EngineLoad | None) -> PodLoad:
    """The load the router sees (see the module docstring)."""
    if engine is None:
        return PodLoad(running=in_flight)
    total = max(in_flight, engine.running + engine.waiting)
    waiting = min(engine.waiting, total)
    return PodLoad(running=total - waiting, waiting=waiting,
                   kv_utilisation=min(1.0, max(0.0, engine.kv_cache_usage)))  # fmt: skip


class Picker:
    """Applies a strategy to candidates. ``index`` None: no prefix-cache routing.
    ``blocking``: the index answers over the network (Redis): call :meth:`pick` off the
    event loop."""

    def __init__(self, index: PrefixIndex | None, config: RouterConfig | None = None,
                 block_size: int = 16, seed: int | None = None, *, blocking: bool = False):  # fmt: skip
        self.index = index
        self.blocking = blocking
        self.router = Router(index, config, block_size) if index is not None else None
        self._turns: dict[str, itertools.count] = defaultdict(itertools.count)
        self._rng = random.Random(seed)

    def pick(self, strategy: str, model: str, candidates: Sequence[Candidate],
             token_ids: Sequence[int] | None, cache_salt: str | None = None) -> Choice:  # fmt: skip
        """One of ``candidates`` (not empty) for this request. May block on a remote index:
        call it off the event loop for one."""
        ordered = sorted(candidates, key=lambda c: c.backend.key)
        if strategy == "prefix-cache" and cache_salt is not None:
            return self._salted(ordered, strategy, cache_salt)
        if strategy == "round-robin":
            turn = next(self._turns[model])
            return Choice(ordered[turn % len(ordered)].backend, strategy, "round-robin")
        if strategy == "random":
            return Choice(self._rng.choice(ordered).backend, strategy, "random")
        if strategy == "prefix-cache":
            if self.router is None:
                return self._least(ordered, strategy, "no-index")
            if not token_ids:
                return self._least(ordered, strategy, "no-prompt-tokens")
            by_key = {c.index_key: c for c in ordered}
            try:
                decision = self.router.route((model, NO_LORA), token_ids,
                                             {k: c.load for k, c in by_key.items()})  # fmt: skip
            except IndexInputError:
                return self._least(ordered, strategy, "unindexable-prompt")
            return Choice(by_key[decision.pod_key].backend, strategy, decision.reason,
                          decision.matched_blocks, decision.prompt_blocks)  # fmt: skip
        return self._least(ordered, strategy, "least-request")

    def _salted(self, ordered: Sequence[Candidate], strategy: str, salt: str) -> Choice:
        loads = [c.load.in_flight for c in ordered]
        threshold = self.router.config.imbalance_threshold if self.router else 16
        if max(loads) - min(loads) > threshold:
            return self._least(ordered, strategy, "imbalance")
        best = max(ordered, key=lambda c: hashlib.blake2b(
            f"{salt}\0{c.backend.key}".encode(), digest_size=8).digest())
        return Choice(best.backend, strategy, "cache-salt")

    @staticmethod
    def _least(ordered: Sequence[Candidate], strategy: str, reason: str) -> Choice:
        best = min(ordered, key=lambda c: (c.load.in_flight, c.load.waiting, c.backend.key))
        return Choice(best.backend, strategy, reason)
