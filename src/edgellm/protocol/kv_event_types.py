"""The KV cache event types of vLLM's wire format, canonical form (see
:mod:`edgellm.protocol.kv_events` for the codec). Data only: no sockets, threads or clocks.

After decoding, every block hash is a non-negative ``int`` (:func:`block_hash_value`
turns the wire's signed int64s and digests into one), and every :class:`BlockStored` is
consistent: ``1 <= block_size <= MAX_BLOCK_SIZE``, token ids in ``0 .. 2**32-1``,
``len(token_ids) == len(block_hashes) * block_size``.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec

_U64 = 1 << 64
MAX_DIGEST_BYTES = 64
MAX_BLOCK_SIZE = 16_384
"""Tokens per block at most (vLLM uses 16..256; hybrid models align blocks to a few
thousand tokens): beyond it a ``BlockStored`` is an :class:`InvalidEvent`."""
MAX_TOKEN = (1 << 32) - 1
BlockSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_SIZE)]
Token = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN)]
# The fast path decodes only non-negative hashes; a signed stream takes the signed twins.
Hash = Annotated[int, msgspec.Meta(ge=0)]


class KVEventDecodeError(ValueError):
    """A payload that is not a valid KV event batch (the only error decoding raises)."""


class InvalidEvent(msgspec.Struct, frozen=True, gc=False):
    """In a decoded batch, the place of a well-formed event whose values are inconsistent.

    ``kind`` is the event's type (``"BlockStored"``), ``reason`` what is wrong. Not a wire
    type: it cannot be encoded.
    """

    kind: str
    reason: str


class KVEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the three event types; the tag is the class name, as in vLLM."""


class BlockStored(KVEvent):
    """The engine now holds these blocks (``token_ids`` is flat, ``block_size`` per block)."""

    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[Token]
    block_size: BlockSize
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVEvent):
    """The engine evicted these blocks."""

    block_hashes: list[Hash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(KVEvent):
    """The engine dropped its whole prefix cache."""


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One published message: a timestamp, the events in order, the data-parallel rank."""

    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


def block_hash_value(h: Any) -> int:
    """A wire block hash as a non-negative int: a signed int64 read as unsigned, a
    1..64-byte digest read big-endian; anything else is a :class:`KVEventDecodeError`."""
    if type(h) is int:
        return _as_u64(h) if h < 0 else h
    if isinstance(h, (bytes, bytearray)):
        if not 1 <= len(h) <= MAX_DIGEST_BYTES:
            raise KVEventDecodeError(f"block hash digest of {len(h)} bytes")
        return int.from_bytes(h, "big")
    raise KVEventDecodeError(f"block hash must be an int or bytes, got {type(h).__name__}")


def _as_u64(h: int) -> int:
    if h < 0:
        if h < -(1 << 63):
            raise KVEventDecodeError(f"block hash {h} is below the int64 range")
        return h + _U64
    return h
