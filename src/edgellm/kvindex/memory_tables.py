"""The tables of the in-memory index (see ``memory.py`` for the layout and its reasons)."""

from __future__ import annotations

import struct
from array import array
from typing import Sequence

from edgellm.kvindex.api import ContextKey, PodMatch, StoreResult
from edgellm.kvindex.hashing import _SWAP, _TOKEN_TYPE, _splitter, chain_packer

KEY_BITS = 60
KEY_MASK = (1 << KEY_BITS) - 1  # h & KEY_MASK allocates a 2-digit int: 32 bytes, not 36
LOW = 4  # the value's low bits keep the hash's top 4 bits: key and value rebuild h
LOW_MASK = (1 << LOW) - 1
FIRST_CHUNK = 8  # blocks hashed first while matching: a miss is cheap...
MATCH_CHUNK = 64  # ...and a long match is hashed in bigger steps
STORED = tuple(StoreResult(n) for n in range(1024))  # frozen, so shared: 0.7 us each to build


class Holdings:
    """One pod's blocks in one context."""

    __slots__ = ("pod_key", "slot", "held_bits", "own_values", "engine_map")

    def __init__(self, pod_key: str, slot: int) -> None:
        self.pod_key = pod_key
        self.slot = slot
        self.held_bits = 1 << (slot + LOW)
        self.own_values = tuple(self.held_bits | low for low in range(1 << LOW))
        self.engine_map: dict[int, int] = {}


class Context:
    """One (model, LoRA) context: its block size, index, pods and their slots."""

    __slots__ = ("key", "block_size", "index", "holdings", "free_slots", "next_slot",
                 "slot_holdings", "last_access", "pack_chain", "pack_block", "ready_masks")

    def __init__(self, key: ContextKey, block_size: int) -> None:
        self.key = key
        self.block_size = block_size
        self.pack_chain = chain_packer(block_size)
        self.pack_block = struct.Struct(f">{block_size}I").pack
        self.ready_masks: dict[tuple[str, ...] | None, int] = {}  # a router asks with the same pods
        self.index: dict[int, int] = {}
        self.holdings: dict[str, Holdings] = {}
        self.slot_holdings: dict[int, Holdings] = {}
        self.free_slots: list[int] = []
        self.next_slot = 0
        self.last_access = 0.0

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
        if self.free_slots:
            slot = min(self.free_slots)
            self.free_slots.remove(slot)
        else:
            slot = self.next_slot
            self.next_slot += 1
        hold = self.holdings[pod_key] = self.slot_holdings[slot] = Holdings(pod_key, slot)
        return hold

    def release(self, key: int, hold: Holdings) -> None:
        """Clear ``hold``'s bit on ``key``; drop the entry when nobody holds it any more."""
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
        """Forget everything ``hold`` holds and free its slot. Returns how many."""
        self.ready_masks.clear()
        for key in hold.engine_map.values():
            self.release(key, hold)
        count = len(hold.engine_map)
        hold.engine_map.clear()
        del self.holdings[hold.pod_key]
        del self.slot_holdings[hold.slot]
        self.free_slots.append(hold.slot)
        return count


_POD_MATCHES: dict[tuple[int, int], PodMatch] = {}


def pod_match(count: int, n_blocks: int) -> PodMatch:
    """A shared (frozen) PodMatch: building one costs 0.7 us, 64 pods make that 45 us."""
    match = _POD_MATCHES.get((count, n_blocks))
    if match is None:
        if len(_POD_MATCHES) > 65536:
            _POD_MATCHES.clear()
        match = _POD_MATCHES[count, n_blocks] = PodMatch(count, 100.0 * count / n_blocks)
    return match


def token_bytes(token_ids: Sequence[int]) -> bytes:
    packed = array(_TOKEN_TYPE, token_ids)
    if _SWAP:
        packed.byteswap()
    return packed.tobytes()


def block_bytes(token_ids: Sequence[int], block_size: int, n_blocks: int) -> tuple[bytes, ...]:
    """``hashing.block_bytes`` without its checks (callers size ``n_blocks`` themselves);
    raises ``OverflowError``/``TypeError`` for a token outside uint32."""
    if not n_blocks:
        return ()
    n_tokens = n_blocks * block_size
    packed = array(_TOKEN_TYPE, token_ids if len(token_ids) == n_tokens else token_ids[:n_tokens])
    if _SWAP:
        packed.byteswap()
    data = packed.tobytes()
    return (data,) if n_blocks == 1 else _splitter(block_size, n_blocks)(data)
