"""Storing a BlockStored event in the in-memory index, in general (``memory.py`` inlines
the common one-block case): checks, the context and holdings it may create, the all-new
chain loop, and re-stores (the rows and their order are ``memory_lru.py``'s).

Functions over the index's :class:`~edgellm.kvindex.memory_state.IndexState`, through its
attributes and methods; called from the writer thread only.
"""

from __future__ import annotations

import logging
from typing import Sequence

from edgellm.kvindex._rows import chain_hashes, pack_tokens
from edgellm.kvindex.api import ContextKey, StoreResult
from edgellm.kvindex.memory_lru import would_loop
from edgellm.kvindex.memory_state import IndexState
from edgellm.kvindex.memory_tables import (
    CHILD_BITS,
    CHILD_MASK,
    KEY_BITS,
    KEY_MASK,
    LOW_MASK,
    STORED,
    T_KEY,
    T_STATE,
    Context,
    Holdings,
)
from edgellm.kvindex.validate import check_event

__all__ = ["new_row", "store", "store_general"]

log = logging.getLogger("edgellm.kvindex.memory")  # the backend's one logger


def store(index: IndexState, context: ContextKey, pod_key: str,
          block_hashes: Sequence[int], parent_block_hash: int | None,
          token_ids: Sequence[int], block_size: int | None, now: float) -> StoreResult:
    """``process_block_stored`` in general (``now``: the clock, read by the caller):
    arguments checked, then the idle sweep if due, then the event."""
    block_hashes, parent, block_size = check_event(
        context, pod_key, block_hashes, parent_block_hash, token_ids, block_size,
        index.config.block_size)
    n = len(block_hashes)
    if not n:
        return STORED[0]
    if now >= index.next_sweep:
        index.sweep(now)
    ctx = index.contexts.get(context)
    hold = None
    if ctx is not None:
        if ctx.block_size != block_size:
            index.counts["block_size_mismatch"] += 1
            log.warning("context %s has block size %d; %d blocks from %s have %d: "
                        "not indexed", context, ctx.block_size, n, pod_key, block_size)
            return StoreResult(0, skipped=n)
        hold = ctx.holdings.get(pod_key)
    prow = None
    if parent is not None:
        prow = None if hold is None else hold.engine_map.get(parent)
        if prow is None:
            index.counts["unknown_parent"] += 1
            return StoreResult(0, unknown_parent=True, skipped=n)
    n_blocks = n if len(token_ids) >= n * block_size else len(token_ids) // block_size
    if not n_blocks:
        return StoreResult(0, skipped=n)
    try:
        data = pack_tokens(token_ids, n_blocks * block_size)
    except (OverflowError, TypeError):
        index.counts["invalid_tokens"] += 1
        return StoreResult(0, skipped=n)
    # Accepted: only now may the event create its context and the pod's holdings.
    if ctx is None:
        ctx = index.new_context(context, block_size)
    ctx.last_access = now
    if hold is None:
        hold = index.new_holdings(ctx, pod_key)
    recency = index.recency
    tick = next(recency.ticks)
    if prow is None:
        h = index.seed
    else:
        parent_key = prow[T_KEY]
        h = (ctx.index[parent_key] & LOW_MASK) << KEY_BITS | parent_key
    # The prefix hashes of the event's blocks depend on its tokens and parent only.
    hashes = chain_hashes(data, block_size, index.seed, h)
    engine_map = hold.engine_map
    if n_blocks < n:
        block_hashes = block_hashes[:n_blocks]
    # (Whether every engine hash is new is found out by add_chain below, which stops at the
    # first one held.)
    if not hold.orphans or hold.orphans.keys().isdisjoint(block_hashes):
        # All new (the bulk of events): one row per block, chained on the previous.
        table = ctx.index
        table_setdefault = table.setdefault
        own_values = hold.own_values
        held_bits = hold.held_bits
        keys: list[int] = []
        append = keys.append
        shared = 0  # blocks whose key was held by others already
        keys_before = len(table)
        for h in hashes:
            key = h & 0xFFFFFFFFFFFFFFF  # KEY_MASK (literals: the loop is ingest's hot path)
            own = own_values[h >> 60]
            value = table_setdefault(key, own)
            if value is not own:
                if value & 15 != own & 15:
                    index.counts["key_collisions"] += 1  # 2**-60 per pair: not indexed
                    break
                shared += 1
                if not value & held_bits:
                    table[key] = value | held_bits
                else:  # the pod holds these tokens under another engine hash already
                    hold.dups[key] = hold.dups.get(key, 1) + 1
            append(key)
        done = len(keys)
        # One call stores the chain's rows, each the child of the one before; they share
        # one recency (``tick``), the last one is the leaf.
        new = engine_map.add_chain(block_hashes, keys, parent, tick << CHILD_BITS | 1,
                                   tick << CHILD_BITS)
        redo = False
        if new != done or len(table) - keys_before != done - shared:
            # An engine hash was held already or came twice, or a key this pod held alone
            # came again (``own`` is then what was there: not new after all). Seen here,
            # which is cheaper than looking first: undo the loop, go the general way.
            undo(index, ctx, hold, block_hashes[:new], hashes[:done])
            redo = True
        if redo:
            stored = store_general(index, ctx, hold, block_hashes, hashes, parent, tick)
        else:
            stored = done
            if stored:
                recency.attach(parent, hold)
                recency.push(block_hashes[stored - 1], tick, hold, parent)
                index.blocks += stored
    else:
        stored = store_general(index, ctx, hold, block_hashes, hashes, parent, tick)
    if not engine_map:
        index.drop(pod_key, context)  # nothing stored after all (a key collision)
    elif index.over_limits(ctx):
        index.enforce_limits(ctx)
    if stored == n and stored < len(STORED):
        return STORED[stored]  # results are frozen: share them (building one costs 0.7 us)
    return StoreResult(stored, skipped=n - stored)


def store_general(index: IndexState, ctx: Context, hold: Holdings,
                  block_hashes: Sequence[int], hashes: Sequence[int],
                  parent: int | None, tick: int) -> int:
    """Some engine hashes are held already (or repeat in the event, or have orphans):
    a re-stored row is refreshed and, should its parent or tokens have changed,
    re-linked in place (its children stay). Returns how many blocks were stored."""
    table = ctx.index
    engine_map = hold.engine_map
    recency = index.recency
    engines = []
    prev = parent
    for engine_hash, h in zip(block_hashes, hashes):
        key, top = h & KEY_MASK, h >> KEY_BITS
        value = table.get(key)
        if value is not None and value & LOW_MASK != top:
            index.counts["key_collisions"] += 1
            break
        row = engine_map.get(engine_hash)
        if row is None:
            hold.hold(table, key, top)
            new_row(index, hold, engine_hash, key, prev, tick, queue=False)
        else:
            old_key, old_parent, state = row
            if old_parent != prev and not would_loop(engine_hash, prev, hold):
                recency.detach(row, hold)
                recency.attach(prev, hold)
                old_parent = prev
            if old_key != key:
                ctx.release(old_key, hold)
                hold.hold(table, key, top)
                old_key = key
            state = engine_map[engine_hash][T_STATE]  # children as they are now
            engine_map[engine_hash] = (old_key, old_parent,
                                       tick << CHILD_BITS | state & CHILD_MASK)
        engines.append(engine_hash)
        prev = engine_hash
    for engine_hash in dict.fromkeys(engines):
        state = engine_map[engine_hash][T_STATE]
        if not state & CHILD_MASK:
            recency.push(engine_hash, state >> CHILD_BITS, hold)
    return len(engines)


def undo(index: IndexState, ctx: Context, hold: Holdings,
         block_hashes: Sequence[int], hashes: Sequence[int]) -> None:
    """Take back what the all-new loop did (rare: see its caller): the rows it added (of
    ``block_hashes``, new to the pod) and what each block (of prefix hash in ``hashes``)
    did to the index. A block whose key the pod already held alone under another engine
    hash did nothing there (it looked new), so it is not released."""
    engine_map = hold.engine_map
    for engine in block_hashes:
        del engine_map[engine]
    own_keys = {row[T_KEY] for row in engine_map.values()}
    for h in hashes:
        key = h & KEY_MASK
        if key in own_keys and ctx.index.get(key) is hold.own_values[h >> KEY_BITS]:
            continue
        ctx.release(key, hold)


def new_row(index: IndexState, hold: Holdings, engine_hash: int, key: int,
            parent: int | None, tick: int, queue: bool = True) -> None:
    """A row for an engine hash the pod does not hold (its key held already); it
    adopts the rows that name it as their parent (orphans), if any."""
    children = hold.orphans.pop(engine_hash, 0) if hold.orphans else 0
    if children and would_loop(engine_hash, parent, hold):
        parent = None
    hold.engine_map[engine_hash] = (key, parent, tick << CHILD_BITS | children)
    index.recency.attach(parent, hold)
    index.blocks += 1
    if queue and not children:
        index.recency.push(engine_hash, tick, hold, parent)
