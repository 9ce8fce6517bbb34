"""The tables of the in-memory index (see ``memory.py`` for the layout and its reasons)."""

from __future__ import annotations

from heapq import heapify, heappop, heappush

from edgellm.kvindex._rows import RowTable
from edgellm.kvindex.api import ContextKey, PodMatch, StoreResult
from edgellm.kvindex.hashing import chain_packer

KEY_BITS = 60
KEY_MASK = (1 << KEY_BITS) - 1  # h & KEY_MASK allocates a 2-digit int: 32 bytes, not 36
LOW = 4  # the value's low bits keep the hash's top 4 bits: key and value rebuild h
LOW_MASK = (1 << LOW) - 1
FIRST_CHUNK = 8  # blocks hashed first while matching: a miss is cheap...
MATCH_CHUNK = 64  # ...and a long match is hashed in bigger steps
STORED = tuple(StoreResult(n) for n in range(1024))  # frozen, so shared: 0.7 us each to build


# A row: what one engine block hash of a pod is, as the value of its holdings' engine map
# (a ``_rows.RowTable``, which keeps rows as three unsigned 64-bit fields in one slot):
# ``(key, parent engine hash or None, state)`` with ``state = eff << CHILD_BITS | live
# children``. So recency ticks stay below 2**44 (~1.7e13: years at any event rate) and a
# row has fewer than 2**20 live children.
T_KEY, T_PARENT, T_STATE = range(3)
CHILD_BITS = 20
CHILD_MASK = (1 << CHILD_BITS) - 1


class Holdings:
    """One pod's blocks in one context.

    ``engine_map``: engine hash -> row (see ``T_KEY``). ``orphans``: engine hashes this pod
    does not hold (any more) that are the parent of some of its rows, with how many (they
    are adopted if the engine stores that block again). ``dups``: index keys the pod holds under more than
    one engine hash (cache salts, multimodal extra keys), with how many: the pod keeps the
    prefix until the last of them goes. ``touched``: index key -> the clock of the last
    match that ended on it for this pod (see ``memory_lru``); written by matching threads.
    """

    __slots__ = ("pod_key", "ctx", "slot", "held_bits", "own_values", "engine_map", "orphans",
                 "dups", "touched", "tail")

    def __init__(self, pod_key: str, ctx: "Context", slot: int) -> None:
        self.pod_key = pod_key
        self.ctx = ctx
        self.slot = slot
        self.held_bits = 1 << (slot + LOW)
        self.own_values = tuple(self.held_bits | low for low in range(1 << LOW))
        self.engine_map = RowTable()
        self.orphans: dict[int, int] = {}
        self.dups: dict[int, int] = {}
        self.touched: dict[int, int] = {}
        self.tail: tuple | None = None  # the pod's newest leaf entry, not queued yet

    def __lt__(self, other: "Holdings") -> bool:
        # Queue entries tie on (eff, engine hash) only for one row's duplicates, which
        # share their holdings; this keeps any other tie from raising.
        return id(self) < id(other)

    def hold(self, index: dict[int, int], key: int, top: int) -> None:
        """Record that this pod holds ``key`` once more (``top``: the hash's top bits)."""
        value = index.get(key)
        if value is None:
            index[key] = self.own_values[top]
        elif not value & self.held_bits:
            index[key] = value | self.held_bits
        else:
            self.dups[key] = self.dups.get(key, 1) + 1


_NO_ROW = (0, None, -1)
SLACK = 1024  # stale entries a leaf queue tolerates beyond its leaf count


class LeafQueue:
    """A lazy heap of leaf entries ``(eff, engine hash, holdings)`` (``memory_lru``) plus
    the entries not heaped yet: a store only appends to ``pending``, an eviction heaps.
    ``filter`` drops the stale entries (its owner calls it once they may outnumber the
    live ones)."""

    __slots__ = ("heap", "pending")

    def __init__(self) -> None:
        self.heap: list[tuple] = []
        self.pending: list[tuple] = []

    def top(self) -> tuple | None:
        """The smallest entry (heaping what is pending first), or ``None``."""
        if self.pending:
            if 8 * len(self.pending) > len(self.heap):
                self.heap += self.pending
                heapify(self.heap)
            else:
                for entry in self.pending:
                    heappush(self.heap, entry)
            self.pending = []
        return self.heap[0] if self.heap else None

    def pop(self) -> None:
        heappop(self.heap)

    def filter(self) -> int:
        """Keep the live entries only; returns how many."""
        self.heap = live_entries(self.heap + self.pending)
        self.pending = []
        return len(self.heap)


def live_entries(entries: list[tuple]) -> list[tuple]:
    """The entries whose row is still that leaf with that recency, as a heap."""
    live = [e for e in entries
            if e[2].engine_map.get(e[1], _NO_ROW)[T_STATE] == e[0] << CHILD_BITS]
    heapify(live)
    return live


class Context:
    """One (model, LoRA) context: its block size, index, pods and their slots, its rows and
    the queue of its leaf rows (``memory_lru``)."""

    __slots__ = ("key", "cid", "block_size", "index", "holdings", "free_slots", "next_slot",
                 "slot_holdings", "last_access", "pack_chain", "ready_masks",
                 "leaves", "_pod_order")

    def __init__(self, key: ContextKey, cid: str, block_size: int) -> None:
        self.key = key
        self.cid = cid
        self.block_size = block_size
        self.pack_chain = chain_packer(block_size)
        self.ready_masks: dict[tuple[str, ...] | None, int] = {}  # a router asks with the same pods
        self.index: dict[int, int] = {}
        self.holdings: dict[str, Holdings] = {}
        self.slot_holdings: dict[int, Holdings] = {}
        self.free_slots: list[int] = []
        self.next_slot = 0
        self.last_access = 0.0
        self.leaves = LeafQueue()
        self._pod_order: tuple[Holdings, ...] | None = None

    def pod_order(self) -> tuple[Holdings, ...]:
        """The holdings in pod-key order (remembered until pods come or go)."""
        order = self._pod_order
        if order is None:
            order = self._pod_order = tuple(sorted(tuple(self.holdings.values()),
                                                   key=lambda hold: hold.pod_key))
        return order

    def ready_mask(self, ready: tuple[str, ...] | None) -> int:
        """The slots of ``ready`` (every pod: ``None``), remembered until slots change."""
        mask = 0
        if ready is None:
            for slot in tuple(self.slot_holdings):
                mask |= 1 << slot
        else:
            holdings = self.holdings
            for pod in ready:
                hold = holdings.get(pod)
                if hold is not None:
                    mask |= 1 << hold.slot
        if len(self.ready_masks) >= 256:
            self.ready_masks.clear()
        self.ready_masks[ready] = mask
        return mask

    def new_holdings(self, pod_key: str) -> Holdings:
        """A slot for a pod new to this context: the lowest free one (masks stay small)."""
        self.ready_masks.clear()
        self._pod_order = None
        if self.free_slots:
            slot = min(self.free_slots)
            self.free_slots.remove(slot)
        else:
            slot = self.next_slot
            self.next_slot += 1
        hold = self.holdings[pod_key] = self.slot_holdings[slot] = Holdings(pod_key, self, slot)
        return hold

    def release(self, key: int, hold: Holdings) -> None:
        """``hold`` holds ``key`` once less: clear its bit when that was the last time (and
        forget its touch), drop the entry when nobody holds it any more."""
        if hold.dups:
            n = hold.dups.get(key)
            if n is not None:
                if n == 2:
                    del hold.dups[key]
                else:
                    hold.dups[key] = n - 1
                return
        if hold.touched:
            hold.touched.pop(key, None)
        value = self.index.get(key)
        if value is None or not value & hold.held_bits:
            return
        value ^= hold.held_bits
        holders = value >> LOW
        if not holders:
            del self.index[key]
        elif holders & (holders - 1):
            self.index[key] = value
        else:  # one holder left: share its interned value instead of a private int
            other = self.slot_holdings[holders.bit_length() - 1]
            self.index[key] = other.own_values[value & LOW_MASK]

    def drop_holdings(self, hold: Holdings) -> int:
        """Forget everything ``hold`` holds and free its slot; returns how many rows. (Its
        queue entries lapse with its engine map; rows link only within one pod's
        holdings, so no other row loses its parent.)"""
        self.ready_masks.clear()
        self._pod_order = None
        hold.dups.clear()
        hold.touched.clear()
        hold.orphans.clear()
        hold.tail = None
        for row in hold.engine_map.values():
            self.release(row[T_KEY], hold)
        count = len(hold.engine_map)
        hold.engine_map.clear()
        del self.holdings[hold.pod_key]
        del self.slot_holdings[hold.slot]
        self.free_slots.append(hold.slot)
        return count


_POD_MATCHES: dict[int, list[PodMatch | None]] = {}


def pod_match(count: int, n_blocks: int) -> PodMatch:
    """A shared (frozen) PodMatch: building one costs 0.7 us, 64 pods make that 45 us."""
    matches = _POD_MATCHES.get(n_blocks)
    if matches is None:
        if len(_POD_MATCHES) > 64:  # prompt lengths seen lately (lists of n+1)
            _POD_MATCHES.clear()
        matches = _POD_MATCHES[n_blocks] = [None] * (n_blocks + 1)
    match = matches[count]
    if match is None:
        match = matches[count] = PodMatch(count, 100.0 * count / n_blocks)
    return match


# memory.py's hot path spells these as literals; they must not drift apart.
assert (KEY_BITS, LOW, CHILD_BITS) == (60, 4, 20)
