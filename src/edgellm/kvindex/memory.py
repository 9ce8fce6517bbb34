"""The in-memory prefix index (the default backend, embedded in the process).

Layout (``memory_tables.py``):

- per context, ``index``: ``key -> value`` where ``key = prefix_hash & (2**60 - 1)`` (an int
  below 2**60, which CPython stores in 32 bytes instead of 36) and ``value = holders << 4 |
  prefix_hash >> 60``: ``holders`` is a bitmask over the context's pod *slots*. The top 4
  bits are kept so the full 64-bit hash can be rebuilt (a chain continues from it) and a
  60-bit key collision is told apart from a hit when storing. Values of blocks held by one
  pod are 16 interned ints per slot, so they cost nothing per block.
- per (pod, context), ``engine_map``: engine block hash -> *row* ``(key, parent engine
  hash, recency << 20 | live children)``, in a compact table (``_rows.c``). It resolves BlockRemoved, finds an event's parent,
  and lists the pod's own entries, so clearing or removing a pod costs time proportional to
  what it holds, never a scan of the context; the parent links and recencies order
  eviction (``memory_lru.py``).

Cost per (pod, block): the index's dict entry and key int, and one 32-byte slot of the
engine map's table (kept 57..85% full), measured in RSS by ``bench/lookup.py``.

Limits (``IndexConfig``): above ``max_prefixes_per_context`` distinct prefixes in a context,
or ``max_blocks`` holdings in all, leaves are evicted least recently used first down to the
limit's low watermark (``memory_lru.py`` defines the order, which the Redis backend shares).
Contexts untouched (no accepted event, no match) for ``idle_eviction_s`` are dropped, looked
for at most every ``eviction_interval_s``; beyond ``max_contexts`` the least recently used
context goes (ties: the smaller ``validate.context_id``).

Threads: as ``api.py`` says, the pipeline makes every mutating call from one worker thread;
the backend relies on that and takes no lock on the ingest path (a lock costs a quarter of a
block's time budget). ``match_prefix`` and ``stats`` may run on any thread at the same time:
they only read, besides plain stores of a context's access time and of a pod's touch of one
key (each dict operation is atomic under the GIL), and they never iterate a live dict, so a
match that overlaps a write sees each block before or after it, never torn.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Sequence

from xxhash import xxh64_intdigest

from edgellm.kvindex._rows import pack_tokens
from edgellm.kvindex.api import ContextKey, PodMatch, StoreResult
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory_match import PromptMatcher
from edgellm.kvindex.memory_state import COUNTS, IndexState
from edgellm.kvindex.memory_store import store
from edgellm.kvindex.memory_tables import STORED, pod_match
from edgellm.kvindex.validate import (
    check_context,
    check_hashes,
    check_pod,
    check_ready,
    prompt_bytes,
)

__all__ = ["MemoryPrefixIndex"]

_UNKNOWN_PARENT_1 = StoreResult(0, unknown_parent=True, skipped=1)
_SKIPPED_1 = StoreResult(0, skipped=1)


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
        self._state = IndexState(self.config, clock)
        self._contexts = self._state.contexts  # the same dict for good: read on every call
        self._clock = clock
        self._seed = self.config.seed
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
                             token_ids: Sequence[int],
                             block_size: int | None = None) -> StoreResult:
        # The hot path of ingest: one event per call, ~1 us budget per block. Most events
        # are one block (a decode step) of a known context and pod, chained on the pod's
        # last block: that case is inlined here, with its checks; anything else (and any
        # argument of an unusual type, or a due sweep) goes through memory_store.store, which
        # checks the arguments with validate.check_event first.
        now = self._clock()
        state = self._state
        if type(block_hashes) is list and len(block_hashes) == 1 and now < state.next_sweep:
            try:
                ctx = self._contexts.get(context)
            except TypeError:  # unhashable: check_event says what is wrong
                ctx = None
            engine_hash = block_hashes[0]
            # (A pod key that is not a str finds no holdings: only checked ones are kept.)
            if (ctx is not None and type(token_ids) is list and type(block_size) is int
                    and block_size == ctx.block_size == len(token_ids)
                    and type(context[1]) is int
                    and type(engine_hash) is int and 0 <= engine_hash <= 0xFFFFFFFFFFFFFFFF):
                hold = ctx.holdings.get(pod_key)
                parent = parent_block_hash
                if hold is not None and engine_hash not in hold.engine_map and not hold.orphans \
                        and (parent is None or type(parent) is int
                             and 0 <= parent <= 0xFFFFFFFFFFFFFFFF):
                    # A new block of a known context and pod: memory_store.store, inlined.
                    engine_map = hold.engine_map
                    if parent is None:
                        h = self._seed
                    else:
                        parent_key = engine_map.key_of(parent)
                        if parent_key is None:
                            state.counts["unknown_parent"] += 1
                            return _UNKNOWN_PARENT_1
                        h = (ctx.index[parent_key] & 15) << 60 | parent_key  # LOW_MASK, KEY_BITS
                    try:
                        data = pack_tokens(token_ids)
                    except (OverflowError, TypeError):
                        state.counts["invalid_tokens"] += 1
                        return _SKIPPED_1
                    h = xxh64_intdigest(ctx.pack_chain(h, data), self._seed)
                    key = h & 0xFFFFFFFFFFFFFFF  # KEY_MASK
                    index = ctx.index
                    value = index.get(key)
                    if value is None:
                        index[key] = hold.own_values[h >> 60]
                    elif value & 15 != h >> 60:
                        state.counts["key_collisions"] += 1
                        return _SKIPPED_1
                    elif not value & hold.held_bits:
                        index[key] = value | hold.held_bits
                    else:
                        hold.dups[key] = hold.dups.get(key, 1) + 1
                    recency = state.recency
                    tick = next(recency.ticks)
                    ctx.last_access = now
                    if parent is None:
                        engine_map.add(engine_hash, key, None, tick << 20)  # CHILD_BITS
                    else:  # the row, and one more child for its parent's
                        engine_map.add_child(engine_hash, key, parent, tick << 20)
                    tail = hold.tail  # recency.push, inlined
                    if tail is not None and tail[1] != parent:
                        recency.enqueue(tail)
                    hold.tail = (tick, engine_hash, hold)
                    state.blocks += 1
                    if state.blocks > state.max_blocks or len(index) > state.max_prefixes:
                        state.enforce_limits(ctx)
                    return STORED[1]
        return store(state, context, pod_key, block_hashes, parent_block_hash, token_ids,
                     block_size, now)

    def process_block_removed(self, context: ContextKey | None, pod_key: str,
                              block_hashes: Sequence[int]) -> int:
        if context is not None:
            check_context(context)
        check_pod(pod_key)
        block_hashes = check_hashes(block_hashes)
        state = self._state
        state.maybe_sweep()
        pods = state.pods.get(pod_key)
        if not pods:
            return 0
        removed = 0
        if context is None:
            targets = list(pods.items())
        else:
            targets = [(context, pods[context])] if context in pods else []
        for context_key, hold in targets:
            ctx = state.contexts[context_key]
            ctx.last_access = state.now
            engine_map = hold.engine_map
            for engine_hash in block_hashes:
                if engine_hash in engine_map:
                    state.remove_row(hold, engine_hash)
                    removed += 1
            if not engine_map:
                state.drop(pod_key, context_key)
        return removed

    def clear_pod(self, pod_key: str, context: ContextKey | None = None) -> int:
        check_pod(pod_key)
        if context is not None:
            check_context(context)
        pods = self._state.pods.get(pod_key)
        if not pods:
            return 0
        keys = list(pods) if context is None else [context] if context in pods else []
        return sum(self._state.drop(pod_key, key) for key in keys)

    def remove_pod(self, pod_key: str) -> int:
        return self.clear_pod(pod_key)

    def match_prefix(self, context: ContextKey, token_ids: Sequence[int],
                     ready_pods: Iterable[str] | None = None) -> dict[str, PodMatch]:
        check_context(context)
        data = prompt_bytes(token_ids)
        ctx = self._contexts.get(context)
        ready = None
        if ready_pods is not None:
            ready = tuple(ready_pods) if type(ready_pods) in (list, tuple) else ready_pods
            try:  # a pod list seen before was checked then (only checked ones are kept)
                seen = ctx is not None and ready in ctx.ready_masks
            except TypeError:
                seen = False
            if not seen:
                ready = check_ready(ready)
        if ctx is None:
            return {}
        ctx.last_access = self._clock()  # a plain store: safe from a reader thread
        alive = ctx.ready_masks.get(ready)
        if alive is None:
            alive = ctx.ready_mask(ready)
        n_blocks = len(data) // (4 * ctx.block_size)
        if not alive or not n_blocks:
            return {}
        matched, keys = self._matcher.walk(ctx, data, n_blocks, alive)
        # Each pod's last matched block is touched, in pod-key order: for eviction, it and
        # every block before it are as recent as this match (memory_lru.py).
        ticks = self._state.recency.ticks
        result = {}
        if len(matched) == 1:
            for slot, count in matched.items():
                hold = ctx.slot_holdings.get(slot)
                if hold is not None:  # None: the pod left while we walked
                    hold.touched[keys[count - 1]] = next(ticks)
                    result[hold.pod_key] = pod_match(count, n_blocks)
            return result
        for hold in ctx.pod_order():
            count = matched.get(hold.slot)
            if count:
                hold.touched[keys[count - 1]] = next(ticks)
                result[hold.pod_key] = pod_match(count, n_blocks)
        return result

    def stats(self) -> dict[str, object]:
        """Counts; ``approx_bytes`` sums what the tables allocated (dicts and row tables)
        and the index's key ints: an upper bound of the resident memory (a dict's spare
        entries stay untouched), which ``bench/lookup.py`` measures."""
        state = self._state
        contexts = list(state.contexts.values())
        prefixes = sum(len(c.index) for c in contexts)
        table_bytes = 0
        for ctx in contexts:
            table_bytes += sys.getsizeof(ctx.index)
            for hold in tuple(ctx.holdings.values()):
                table_bytes += sys.getsizeof(hold.engine_map)
        return {
            "backend": "memory",
            "contexts": len(contexts),
            "pods": len(state.pods),
            "blocks": state.blocks,
            "prefixes": prefixes,
            "approx_bytes": table_bytes + 32 * prefixes,
            **{k: state.counts[k] for k in COUNTS},
        }

    def close(self) -> None:
        self._closed = True
        self._state.reset()

    def __enter__(self) -> "MemoryPrefixIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
