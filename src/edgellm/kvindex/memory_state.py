"""The state of the in-memory index and the operations that keep it whole.

:class:`IndexState` owns the contexts, the pods' holdings, the recency clock and leaf
queues, the block count and the counters; its methods create and drop contexts and
holdings, forget rows, sweep idle contexts and enforce the limits. The index
(``memory.py``) and the store path (``memory_store.py``) work through them: neither
reaches into the other. Writer-thread only, like every mutation of the index.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable

from edgellm.kvindex.api import ContextKey
from edgellm.kvindex.config import IndexConfig, low_watermark
from edgellm.kvindex.memory_lru import Recency, evict
from edgellm.kvindex.memory_tables import T_KEY, Context, Holdings
from edgellm.kvindex.validate import context_id

log = logging.getLogger("edgellm.kvindex.memory")  # the backend's one logger

COUNTS = ("evicted_blocks", "evicted_contexts", "unknown_parent", "invalid_tokens",
          "block_size_mismatch", "key_collisions")  # fmt: skip


class IndexState:
    """What one :class:`~edgellm.kvindex.memory.MemoryPrefixIndex` holds (see the module
    docstring). Its attributes are its data; its methods the changes that must go
    together (a dropped holding's blocks leave the count, an evicted row its parent...)."""

    def __init__(self, config: IndexConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.seed = config.seed
        self.max_blocks = config.max_blocks
        self.max_prefixes = config.max_prefixes_per_context
        self.contexts: dict[ContextKey, Context] = {}
        self.pods: dict[str, dict[ContextKey, Holdings]] = {}
        self.recency = Recency(self.contexts)
        self.blocks = 0
        self.counts = Counter[str]()
        self.now = clock()
        self.next_sweep = self.now + config.eviction_interval_s

    def reset(self) -> None:
        """Forget everything (the index closed)."""
        self.contexts.clear()
        self.pods.clear()
        self.recency = Recency(self.contexts)
        self.blocks = 0

    # --- contexts and holdings ---------------------------------------------------------

    def new_context(self, key: ContextKey, block_size: int) -> Context:
        """A context for ``key``; beyond ``max_contexts`` the least recently used goes."""
        if len(self.contexts) >= self.config.max_contexts:
            victim = min(self.contexts.values(), key=lambda c: (c.last_access, c.cid))
            log.info("dropping context %s: more than %d contexts", victim.key,
                     self.config.max_contexts)  # fmt: skip
            self.drop_context(victim)
        ctx = self.contexts[key] = Context(key, context_id(key), block_size)
        return ctx

    def new_holdings(self, ctx: Context, pod_key: str) -> Holdings:
        hold = ctx.new_holdings(pod_key)
        pods = self.pods.get(pod_key)
        if pods is None:
            pods = self.pods[pod_key] = {}
        pods[ctx.key] = hold
        return hold

    def drop(self, pod_key: str, key: ContextKey) -> int:
        """Forget what ``pod_key`` holds in context ``key``; returns how many blocks."""
        pods = self.pods[pod_key]
        hold = pods.pop(key)
        if not pods:
            del self.pods[pod_key]
        count = self.contexts[key].drop_holdings(hold)
        self.blocks -= count
        return count

    def drop_context(self, ctx: Context) -> None:
        for pod_key in list(ctx.holdings):
            self.drop(pod_key, ctx.key)
        del self.contexts[ctx.key]
        self.counts["evicted_contexts"] += 1

    def remove_row(self, hold: Holdings, engine_hash: int) -> None:
        """Forget one row (BlockRemoved)."""
        row = self.recency.kill(engine_hash, hold)
        hold.ctx.release(row[T_KEY], hold)
        self.blocks -= 1

    # --- time and limits ---------------------------------------------------------------

    def maybe_sweep(self) -> None:
        """Read the clock (``now``) and drop idle contexts when it is time."""
        now = self.now = self.clock()
        if now >= self.next_sweep:
            self.sweep(now)

    def sweep(self, now: float) -> None:
        self.next_sweep = now + self.config.eviction_interval_s
        limit = now - self.config.idle_eviction_s
        for ctx in [c for c in self.contexts.values() if c.last_access <= limit]:
            log.info("dropping context %s: idle for %.0f s", ctx.key, now - ctx.last_access)
            self.drop_context(ctx)

    def over_limits(self, ctx: Context) -> bool:
        return self.blocks > self.max_blocks or len(ctx.index) > self.max_prefixes

    def enforce_limits(self, ctx: Context) -> None:
        """The context's prefix limit first, then the budget; each down to its low
        watermark (``config.low_watermark``)."""
        if len(ctx.index) > self.max_prefixes:
            low = low_watermark(self.max_prefixes)
            self._evict(ctx, lambda n: len(ctx.index) > low)
        if self.blocks > self.max_blocks:
            low, blocks = low_watermark(self.max_blocks), self.blocks
            self._evict(None, lambda n: blocks - n > low)

    def _evict(self, ctx: Context | None, over: Callable[[int], bool]) -> None:
        n = evict(self.recency, ctx, over, lambda hold: self.drop(hold.pod_key, hold.ctx.key))
        self.blocks -= n
        self.counts["evicted_blocks"] += n


__all__ = ["COUNTS", "IndexState"]
