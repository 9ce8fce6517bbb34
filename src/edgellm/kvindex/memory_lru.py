"""LRU eviction of the in-memory index: leaves first, by recency, refreshed by matches.

The order (the same in the Redis backend, and in ``tests/kvindex_model.py``):

- A *row* is one engine block hash a pod holds in a context. Its parent is the row of the
  block before it (the event's ``parent_block_hash`` for the first block of an event, the
  previous block for the others; none for a root). A *leaf* has no live child row.
- A clock ticks once per accepted BlockStored (every row the event stores or re-stores
  gets that tick as its recency ``eff``) and once per pod in a match's answer, in pod-key
  order: that tick is the pod's *touch* of the index key of its last matched block.
- ``effective(row) = max(eff, touch of (pod, row's key))``. When a row leaves its parent
  (removed, evicted, re-parented) the parent's ``eff`` becomes ``max(parent eff,
  effective(row))``: a block is at least as recent as anything below it ever was, so
  touching the deepest matched block refreshes the whole matched prefix at the cost of one
  dict write per pod.
- The victim is the leaf with the smallest ``(effective, engine hash)``: among a context's
  leaves for ``max_prefixes_per_context``, among all for ``max_blocks``. Evicting only
  leaves never leaves a block whose ancestors are gone (the blocks an engine removes
  itself can do that: the index keeps what the engine says it holds).

Rows link to their parent by engine hash. A row whose parent the pod no longer holds is
an *orphan* (only an engine's own BlockRemoved makes one; eviction takes leaves only): its
parent's hash is counted in ``Holdings.orphans`` and, should the engine store that block
again, the new row adopts it. A re-store that would make a loop (its new parent chain
runs through the row itself, which only a malformed event can ask for) keeps the old
parent, and a new row that would close a loop through its orphans starts as a root.

Leaves are queued as entries ``(eff, engine hash, holdings)`` in lazy heaps
(``memory_tables.LeafQueue``), one per context and one for all, sharing entries: an entry
whose row is gone, no longer a leaf or has another ``eff`` is dropped when it surfaces; an
entry whose row was touched since is queued again with the touch folded into ``eff``.
A pod's newest leaf waits in its holdings (``tail``) until its next leaf: a decode step
makes its parent a leaf no more, so a chain growing one block at a time queues nothing. All
queues are filtered of stale entries whenever as many entries as were live at the last
filtering have been added, so each entry is handled a bounded number of times: eviction
costs O(log n) per evicted row (a chain's interior O(1): ``evict``), plus one look at every
pod's tail per eviction pass, and a store below the limits at most two appends.
"""

from __future__ import annotations

from itertools import count
from typing import Callable

from edgellm.kvindex.memory_tables import (
    CHILD_BITS,
    CHILD_MASK,
    T_KEY,
    T_PARENT,
    T_STATE,
    Context,
    Holdings,
    SLACK,
    LeafQueue,
)

__all__ = ["Recency", "effective", "evict", "would_loop"]


class Recency:
    """The clock and the leaf queue of one index (each context has its own queue too)."""

    def __init__(self, contexts: dict) -> None:
        """``contexts``: the index's contexts (their queues are filtered with the global)."""
        self.ticks = count(1)  # next() is atomic under the GIL: matching threads tick too
        self.queue = LeafQueue()
        self.room = SLACK  # entries appended before the next filtering
        self._contexts = contexts

    def push(self, engine: int, eff: int, hold: Holdings, parent: int | None = None) -> None:
        """The row of ``engine`` (child of ``parent``'s) is a leaf whose ``eff`` just changed
        or that just became one. Its entry becomes the pod's ``tail``; the previous tail
        is queued unless this row supersedes it (the same row, or its child)."""
        tail = hold.tail
        if tail is not None and tail[1] != parent and tail[1] != engine:
            self.enqueue(tail)
        hold.tail = (eff, engine, hold)

    def enqueue(self, entry: tuple) -> None:
        self.queue.pending.append(entry)
        entry[2].ctx.leaves.pending.append(entry)
        if len(self.queue.pending) > self.room:
            self.filter()

    def flush(self) -> None:
        """Queue every pod's tail (before choosing victims)."""
        for ctx in self._contexts.values():
            for hold in ctx.holdings.values():
                if hold.tail is not None:
                    self.enqueue(hold.tail)
                    hold.tail = None

    def filter(self) -> None:
        """Drop stale entries from every queue; the next filtering comes once as many
        entries as are live now (plus ``SLACK``) have been appended."""
        self.room = self.queue.filter() + SLACK
        for ctx in self._contexts.values():
            ctx.leaves.filter()

    def attach(self, parent: int | None, hold: Holdings) -> None:
        """A new child row under ``parent``'s (which the pod holds, or ``None``)."""
        if parent is not None:
            hold.engine_map.bump(parent)

    def detach(self, row: tuple, hold: Holdings) -> None:
        """``row`` leaves its parent, which inherits its recency (and may become a leaf)."""
        parent = row[T_PARENT]
        if parent is None:
            return
        left = hold.engine_map.leave(parent, effective(row, hold))
        if left is None:  # an orphan
            _one_orphan_less(hold, parent)
        elif not left & CHILD_MASK:
            self.enqueue((left >> CHILD_BITS, parent, hold))

    def kill(self, engine: int, hold: Holdings) -> tuple:
        """Forget the row of ``engine`` (its key not yet released: its touch still counts);
        its children become orphans. Returns the row."""
        row = hold.engine_map[engine]
        self.detach(row, hold)
        children = row[T_STATE] & CHILD_MASK
        if children:
            hold.orphans[engine] = children
        del hold.engine_map[engine]
        return row

    def victim(self, ctx: Context | None) -> tuple[int, Holdings] | None:
        """The next leaf to evict (its engine hash and holdings): of ``ctx``, or of the
        whole index (``None``)."""
        queue = self.queue if ctx is None else ctx.leaves
        while True:
            entry = queue.top()
            if entry is None:
                return None
            eff, engine, hold = entry
            row = hold.engine_map.get(engine)
            if row is None or row[T_STATE] != eff << CHILD_BITS:
                queue.pop()
                continue
            touch = hold.touched.get(row[T_KEY]) if hold.touched else None
            if touch is not None and touch > eff:
                queue.pop()
                hold.engine_map.add(engine, row[T_KEY], row[T_PARENT], touch << CHILD_BITS)
                self.enqueue((touch, engine, hold))
                continue
            return engine, hold


def effective(row: tuple, hold: Holdings) -> int:
    eff = row[T_STATE] >> CHILD_BITS
    if hold.touched:
        touch = hold.touched.get(row[T_KEY])
        if touch is not None and touch > eff:
            return touch
    return eff


def would_loop(engine: int, parent: int | None, hold: Holdings) -> bool:
    """Whether linking ``engine``'s row under ``parent`` would make a loop: ``engine`` is
    on ``parent``'s upward chain (through the first link the pod no longer holds)."""
    engine_map = hold.engine_map
    while parent is not None:
        if parent == engine:
            return True
        row = engine_map.get(parent)
        if row is None:
            return False
        parent = row[T_PARENT]
    return False


def evict(recency: Recency, ctx: Context | None, over: Callable[[int], bool],
          drop: Callable[[Holdings], object]) -> int:
    """Evict victims (of ``ctx``, or of all) while ``over(evicted so far)``; returns how
    many. A pod's holdings left empty are handed to ``drop``; the caller counts the
    evicted blocks.

    Evicting a leaf often makes its parent the next victim (a chain goes tail first): the
    parent is compared with the queue's head and, when it comes first, evicted at once,
    without a trip through the queue (the head stays the same meanwhile, so it is looked
    at once per chain). A victim is a leaf, so its removal orphans nothing.
    """
    n = 0
    recency.flush()
    chain: tuple | None = None  # (eff, engine, hold): a parent just made a leaf
    head: tuple[int, int] | None = None  # (eff, engine) of the queue's head, while known
    try:
        while over(n):
            if chain is not None:
                _, engine, hold = chain
                chain = None
            else:
                found = recency.victim(ctx)
                if found is None:
                    break
                engine, hold = found
                head = None
            engine_map = hold.engine_map
            key, parent, state = engine_map.pop(engine)
            if parent is not None:
                eff = state >> CHILD_BITS
                if hold.touched:
                    touch = hold.touched.get(key)
                    if touch is not None and touch > eff:
                        eff = touch
                left = engine_map.leave(parent, eff)
                if left is None:  # an orphan leaf: the engine removed its parent itself
                    _one_orphan_less(hold, parent)
                elif not left & CHILD_MASK:
                    chain = (left >> CHILD_BITS, parent, hold)
            hold.ctx.release(key, hold)
            n += 1
            if not engine_map:
                drop(hold)
                chain = None
            if chain is None:
                continue
            if hold.touched and engine_map[chain[1]][T_KEY] in hold.touched:
                recency.enqueue(chain)  # its touch may reorder it: victim() folds it in
                chain = head = None
                continue
            if head is None:
                found = recency.victim(ctx)
                if found is not None:
                    head = (found[1].engine_map[found[0]][T_STATE] >> CHILD_BITS, found[0])
            if head is not None and head < chain[:2]:
                recency.enqueue(chain)
                chain = None
    finally:
        if chain is not None:
            recency.enqueue(chain)
    return n


def _one_orphan_less(hold: Holdings, parent: int) -> None:
    """A row whose parent ``hold`` does not hold (an orphan) is gone."""
    n = hold.orphans[parent] - 1
    if n:
        hold.orphans[parent] = n
    else:
        del hold.orphans[parent]
