"""The in-memory prefix index (the default backend, embedded in the process).

Layout, chosen so that a block held by one pod costs about 150 bytes (``bench/lookup.py``):

- per context, ``index``: ``key -> value`` where ``key = prefix_hash & (2**60 - 1)`` (an int
  below 2**60, which CPython stores in 32 bytes instead of 36) and ``value = holders << 4 |
  prefix_hash >> 60``: ``holders`` is a bitmask over the context's pod *slots*. The top 4
  bits are kept so the full 64-bit hash can be rebuilt (a chain continues from it) and a
  60-bit key collision is told apart from a hit when storing. Values of blocks held by one
  pod are 16 interned ints per slot, so they cost nothing per block.
- per (pod, context), ``engine_map``: engine block hash -> the very same key object, in
  recency order (a re-stored block moves to the end). It resolves BlockRemoved, finds an
  event's parent, and lists the pod's own entries, so clearing or removing a pod costs time
  proportional to what it holds, never a scan of the context.

Limits (``IndexConfig``): when a context holds more distinct prefixes than
``max_prefixes_per_context``, or the index more holdings than ``max_blocks``, the pod-context
with the most holdings (ties: smallest ``(model, lora, pod_key)``) loses its least recently
stored blocks, the overflow at a time: least-recently-used within a pod, largest pod first,
so one pod that leaks (missed removals) cannot flush the others. Contexts untouched (no
event, no match) for ``idle_eviction_s`` are dropped, looked for at most every
``eviction_interval_s``; beyond ``max_contexts`` the least recently used context goes.

Threads: as ``api.py`` says, the pipeline makes every mutating call from one worker thread;
the backend relies on that and takes no lock on the ingest path (a lock costs a quarter of a
block's time budget). ``match_prefix`` and ``stats`` may run on any thread at the same time:
they only read, each dict operation is atomic under the GIL, and they never iterate a live
dict, so a match that overlaps a write sees each block before or after it, never torn.
"""

from __future__ import annotations

import logging
import struct
import sys
import time
from collections import Counter
from itertools import islice
from typing import Callable, Iterable, Sequence

from xxhash import xxh64_intdigest

from edgellm.kvindex.api import ContextKey, PodMatch, StoreResult
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.hashing import chain_packer, engine_key, engine_keys
from edgellm.kvindex.memory_match import PromptMatcher
from edgellm.kvindex.memory_tables import (
    KEY_BITS,
    KEY_MASK,
    LOW_MASK,
    STORED,
    Context,
    Holdings,
    block_bytes,
    pod_match,
)

__all__ = ["MemoryPrefixIndex"]

_U64 = (1 << 64) - 1

log = logging.getLogger(__name__)

class MemoryPrefixIndex:
    """:class:`edgellm.kvindex.api.PrefixIndex` in this process's memory."""

    def __init__(self, config: IndexConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, *,
                 match_cache_chunks: int = 2048) -> None:
        """``match_cache_chunks``: how many 64-block chunks of prompts ``match_prefix``
        remembers the hash chain of (~2.5 KB each; 0 turns the cache off). A public
        attribute: it may be changed at any time."""
        self.config = config if config is not None else IndexConfig()
        self._matcher = PromptMatcher(self.config.seed, match_cache_chunks)
        self._clock = clock
        self._seed = self.config.seed
        self._max_blocks = self.config.max_blocks
        self._max_prefixes = self.config.max_prefixes_per_context
        self._contexts: dict[ContextKey, Context] = {}
        self._pods: dict[str, dict[ContextKey, Holdings]] = {}
        self._blocks = 0
        self._now = clock()
        self._next_sweep = self._now + self.config.eviction_interval_s
        self._counts = Counter[str]()
        self._closed = False

    @property
    def match_cache_chunks(self) -> int:
        return self._matcher.match_cache_chunks

    @match_cache_chunks.setter
    def match_cache_chunks(self, value: int) -> None:
        self._matcher.match_cache_chunks = value

    # --- PrefixIndex -------------------------------------------------------------------

    def is_ready(self) -> bool:
        return not self._closed

    def process_block_stored(self, context: ContextKey, pod_key: str,
                             block_hashes: Sequence[int], parent_block_hash: int | None,
                             token_ids: Sequence[int], block_size: int) -> StoreResult:
        # The hot path of ingest: one event per call, ~1 us budget per block, so the
        # common case (known context and pod, new blocks) is inlined here.
        if not block_hashes:
            return STORED[0]
        if block_hashes[0] > _U64:  # digests (sha256): keyed by their low 64 bits
            block_hashes = engine_keys(block_hashes)
        if parent_block_hash is not None and parent_block_hash > _U64:
            parent_block_hash = engine_key(parent_block_hash)
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        ctx = self._contexts.get(context)
        if ctx is None or ctx.block_size != block_size:
            ctx = self._context_for_store(context, pod_key, block_size, len(block_hashes))
            if ctx is None:
                return StoreResult(0, skipped=len(block_hashes))
        ctx.last_access = now
        hold = ctx.holdings.get(pod_key)
        if hold is None:
            hold = self._new_holdings(ctx, pod_key)
        engine_map = hold.engine_map
        if parent_block_hash is None:
            h = self._seed
        else:
            parent_key = engine_map.get(parent_block_hash)
            parent_value = None if parent_key is None else ctx.index.get(parent_key)
            if parent_value is None or not parent_value & hold.held_bits:
                self._counts["unknown_parent"] += 1
                self._forget_if_empty(ctx, hold)
                return StoreResult(0, unknown_parent=True, skipped=len(block_hashes))
            h = (parent_value & LOW_MASK) << KEY_BITS | parent_key
        if len(block_hashes) == 1 and len(token_ids) == block_size:
            # One block (a decode step): the bulk of events, so every bytecode counts.
            engine_hash = block_hashes[0]
            if engine_hash not in engine_map:
                try:
                    h = xxh64_intdigest(ctx.pack_chain(h, ctx.pack_block(*token_ids)), self._seed)
                except struct.error:
                    self._counts["invalid_tokens"] += 1
                    self._forget_if_empty(ctx, hold)
                    return StoreResult(0, skipped=1)
                key = h & KEY_MASK
                own = hold.own_values[h >> KEY_BITS]
                value = ctx.index.setdefault(key, own)
                if value is not own:
                    if value & LOW_MASK != own & LOW_MASK:
                        self._counts["key_collisions"] += 1
                        return StoreResult(0, skipped=1)
                    if not value & hold.held_bits:
                        ctx.index[key] = value | hold.held_bits
                engine_map[engine_hash] = key
                self._blocks += 1
                if self._blocks > self._max_blocks or len(ctx.index) > self._max_prefixes:
                    self._enforce_limits(ctx)
                return STORED[1]
        n_blocks = len(block_hashes)
        if len(token_ids) < n_blocks * block_size:
            n_blocks = len(token_ids) // block_size
        try:
            if n_blocks == 1:
                blocks: Sequence[bytes] = (ctx.pack_block(*token_ids[:block_size]),)
            else:
                blocks = block_bytes(token_ids, block_size, n_blocks)
        except (OverflowError, TypeError, struct.error):
            self._counts["invalid_tokens"] += 1
            self._forget_if_empty(ctx, hold)
            return StoreResult(0, skipped=len(block_hashes))
        before = len(engine_map)
        if not engine_map.keys().isdisjoint(block_hashes):
            stored = self._store_general(ctx, hold, block_hashes, blocks, h)
        else:
            seed = self._seed
            pack = ctx.pack_chain
            index = ctx.index
            setdefault = index.setdefault
            own_values = hold.own_values
            held_bits = hold.held_bits
            start = h
            stored = n_blocks
            for engine_hash, data in zip(block_hashes, blocks):
                h = xxh64_intdigest(pack(h, data), seed)
                key = h & KEY_MASK
                own = own_values[h >> KEY_BITS]
                value = setdefault(key, own)
                if value is not own:
                    if value & LOW_MASK != own & LOW_MASK:
                        self._counts["key_collisions"] += 1  # 2**-60 per pair: not indexed
                        stored = len(engine_map) - before
                        break
                    if not value & held_bits:
                        index[key] = value | held_bits
                engine_map[engine_hash] = key
            if len(engine_map) - before != stored:
                self._repair_duplicates(ctx, hold, block_hashes, blocks, start)
        self._blocks += len(engine_map) - before
        if self._blocks > self._max_blocks or len(ctx.index) > self._max_prefixes:
            self._enforce_limits(ctx)
        if stored == len(block_hashes) and stored < len(STORED):
            return STORED[stored]  # results are frozen: share them (building one costs 0.7 us)
        return StoreResult(stored, skipped=len(block_hashes) - stored)

    def process_block_removed(self, context: ContextKey | None, pod_key: str,
                              block_hashes: Sequence[int]) -> int:
        self._maybe_sweep()
        pods = self._pods.get(pod_key)
        if not pods:
            return 0
        block_hashes = engine_keys(block_hashes)
        removed = 0
        if context is None:
            targets = list(pods.items())
        else:
            targets = [(context, pods[context])] if context in pods else []
        for context_key, hold in targets:
            ctx = self._contexts[context_key]
            self._touch_ctx(ctx)
            pop = hold.engine_map.pop
            release = ctx.release
            for engine_hash in block_hashes:
                key = pop(engine_hash, None)
                if key is not None:
                    release(key, hold)
                    removed += 1
        self._blocks -= removed
        return removed

    def clear_pod(self, pod_key: str, context: ContextKey | None = None) -> int:
        pods = self._pods.get(pod_key)
        if not pods:
            return 0
        keys = list(pods) if context is None else [context] if context in pods else []
        return sum(self._drop(pod_key, key) for key in keys)

    def remove_pod(self, pod_key: str) -> int:
        return self.clear_pod(pod_key)

    def match_prefix(self, context: ContextKey, token_ids: Sequence[int],
                     ready_pods: Iterable[str] | None = None) -> dict[str, PodMatch]:
        ctx = self._contexts.get(context)
        if ctx is None:
            return {}
        ctx.last_access = self._clock()  # a plain store: safe from a reader thread
        ready = None if ready_pods is None else tuple(ready_pods)
        alive = ctx.ready_masks.get(ready)
        if alive is None:
            alive = ctx.ready_mask(ready)
        bs = ctx.block_size
        n_blocks = len(token_ids) // bs
        if not alive or not n_blocks:
            return {}
        matched = self._matcher.walk(ctx, token_ids, n_blocks, alive)
        result = {}
        for slot, count in matched.items():
            hold = ctx.slot_holdings.get(slot)
            if hold is not None:  # None: the pod left while we walked
                result[hold.pod_key] = pod_match(count, n_blocks)
        return result

    def stats(self) -> dict[str, object]:
        """Counts; ``approx_bytes`` sums the tables' sizes and 68 bytes of ints per holding
        (one engine hash, one key): an estimate, ``bench/lookup.py`` measures."""
        contexts = list(self._contexts.values())
        prefixes = sum(len(c.index) for c in contexts)
        table_bytes = 0
        for ctx in contexts:
            table_bytes += sys.getsizeof(ctx.index)
            for hold in tuple(ctx.holdings.values()):
                table_bytes += sys.getsizeof(hold.engine_map)
        return {
            "backend": "memory",
            "contexts": len(contexts),
            "pods": len(self._pods),
            "blocks": self._blocks,
            "prefixes": prefixes,
            "approx_bytes": table_bytes + 36 * self._blocks + 32 * prefixes,
            **{k: self._counts[k] for k in ("evicted_blocks", "evicted_contexts",
                                            "unknown_parent", "invalid_tokens",
                                            "block_size_mismatch", "key_collisions")},
        }

    def close(self) -> None:
        self._closed = True
        self._contexts.clear()
        self._pods.clear()
        self._blocks = 0

    def __enter__(self) -> "MemoryPrefixIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- storing ---------------------------------------------------------------------

    def _store_general(self, ctx: Context, hold: Holdings, block_hashes: Sequence[int],
                       blocks: Sequence[bytes], h: int) -> int:
        """Some engine hashes are held already: re-storing one refreshes its recency and,
        should its tokens have changed, re-points it."""
        seed = self._seed
        pack = chain_packer(ctx.block_size)
        index = ctx.index
        engine_map = hold.engine_map
        stored = 0
        for engine_hash, data in zip(block_hashes, blocks):
            h = xxh64_intdigest(pack(h, data), seed)
            key = h & KEY_MASK
            value = index.get(key)
            if value is not None and value & LOW_MASK != h >> KEY_BITS:
                self._counts["key_collisions"] += 1
                break
            old = engine_map.pop(engine_hash, None)
            if old is not None and old != key:
                ctx.release(old, hold)
            if value is None:
                index[key] = hold.own_values[h >> KEY_BITS]
            elif not value & hold.held_bits:
                index[key] = value | hold.held_bits
            engine_map[engine_hash] = key
            stored += 1
        return stored

    def _repair_duplicates(self, ctx: Context, hold: Holdings, block_hashes: Sequence[int],
                           blocks: Sequence[bytes], h: int) -> None:
        """An event listed one engine hash twice: the map kept its last block; release the
        earlier blocks it pointed to, unless another engine hash still points there."""
        pack = chain_packer(ctx.block_size)
        keys = []
        for data in blocks[: len(block_hashes)]:
            h = xxh64_intdigest(pack(h, data), self._seed)
            keys.append(h & KEY_MASK)
        kept = {hold.engine_map.get(e) for e in block_hashes}
        for key in set(keys) - kept:
            ctx.release(key, hold)

    # --- contexts, limits, eviction --------------------------------------------------

    def _context_for_store(self, key: ContextKey, pod_key: str, block_size: int,
                           n_blocks: int) -> Context | None:
        """The context a BlockStored goes to, created if new; ``None`` if the event's block
        size differs from the context's (its hashes would never match: not indexed)."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        ctx = self._contexts.get(key)
        if ctx is None:
            if len(self._contexts) >= self.config.max_contexts:
                victim = min(self._contexts.values(), key=lambda c: (c.last_access, c.key))
                log.info("dropping context %s: more than %d contexts", victim.key,
                         self.config.max_contexts)
                self._drop_context(victim)
            ctx = self._contexts[key] = Context(key, block_size)
            return ctx
        if ctx.block_size != block_size:
            self._counts["block_size_mismatch"] += 1
            log.warning("context %s has block size %d; %d blocks from %s have %d: not indexed",
                        key, ctx.block_size, n_blocks, pod_key, block_size)
            return None
        return ctx

    def _new_holdings(self, ctx: Context, pod_key: str) -> Holdings:
        hold = ctx.new_holdings(pod_key)
        pods = self._pods.get(pod_key)
        if pods is None:
            pods = self._pods[pod_key] = {}
        pods[ctx.key] = hold
        return hold

    def _touch_ctx(self, ctx: Context) -> None:
        ctx.last_access = self._now

    def _maybe_sweep(self) -> None:
        """Read the clock (``_now``) and drop idle contexts when it is time (writers only)."""
        now = self._now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self.config.eviction_interval_s
        limit = now - self.config.idle_eviction_s
        for ctx in [c for c in self._contexts.values() if c.last_access <= limit]:
            log.info("dropping context %s: idle for %.0f s", ctx.key, now - ctx.last_access)
            self._drop_context(ctx)

    def _drop_context(self, ctx: Context) -> None:
        for pod_key in list(ctx.holdings):
            self._drop(pod_key, ctx.key)
        del self._contexts[ctx.key]
        self._counts["evicted_contexts"] += 1

    def _drop(self, pod_key: str, key: ContextKey) -> int:
        pods = self._pods[pod_key]
        hold = pods.pop(key)
        if not pods:
            del self._pods[pod_key]
        count = self._contexts[key].drop_holdings(hold)
        self._blocks -= count
        return count

    def _forget_if_empty(self, ctx: Context, hold: Holdings) -> None:
        if not hold.engine_map:
            self._drop(hold.pod_key, ctx.key)

    def _enforce_limits(self, ctx: Context) -> None:
        limit = self.config.max_prefixes_per_context
        while len(ctx.index) > limit:
            victim = min(ctx.holdings.values(),
                         key=lambda hd: (-len(hd.engine_map), hd.pod_key))
            self._evict(ctx, victim, len(ctx.index) - limit)
        budget = self.config.max_blocks
        while self._blocks > budget:
            _, _, victim_ctx, victim = min(
                ((-len(hd.engine_map), (c.key, hd.pod_key), c, hd)
                 for c in self._contexts.values() for hd in c.holdings.values()),
                key=lambda t: (t[0], t[1]))
            self._evict(victim_ctx, victim, self._blocks - budget)

    def _evict(self, ctx: Context, hold: Holdings, count: int) -> None:
        engine_map = hold.engine_map
        victims = list(islice(engine_map, count))
        for engine_hash in victims:
            ctx.release(engine_map.pop(engine_hash), hold)
        self._blocks -= len(victims)
        self._counts["evicted_blocks"] += len(victims)
        if not engine_map:
            self._drop(hold.pod_key, ctx.key)
