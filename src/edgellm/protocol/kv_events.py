"""The KV cache event batch codec, wire-compatible with vLLM's ``ZmqEventPublisher``.

Data in, data out: no sockets, threads or clocks here.

Wire forms accepted by :func:`decode_batch` (vLLM changed them over its releases):

- the batch: a msgpack array ``[ts, events, data_parallel_rank?]`` (``array_like``, what
  every vLLM release sends, 0.10 to 0.33) or a map ``{"ts", "events",
  "data_parallel_rank"?}`` (accepted too);
- each event: a tagged array ``["BlockStored", block_hashes, parent_block_hash, token_ids,
  block_size, lora_id?, medium?, lora_name?, extra_keys?, group_idx?, kv_cache_spec_kind?,
  kv_cache_spec_sliding_window?]`` / ``["BlockRemoved", block_hashes, medium?, group_idx?]``
  / ``["AllBlocksCleared"]``, or the same as a map with a ``"type"`` key holding the tag;
- trailing fields may be missing (older engines) and unknown extra fields (newer engines)
  are ignored, in both forms;
- block hashes are integers (signed int64 values are read as unsigned 64-bit: a negative
  ``h`` becomes ``h + 2**64``) or raw digests (``bytes`` of 1..64 bytes, read big-endian as
  a non-negative int, so an 8-byte digest equals the u64 an engine would have sent).

After decoding, every ``block_hashes`` entry and ``parent_block_hash`` is a non-negative
``int``, and every :class:`BlockStored` is consistent (spec 2 §1): ``1 <= block_size <=
MAX_BLOCK_SIZE``, every token id in ``0 .. 2**32-1`` and ``len(token_ids) ==
len(block_hashes) * block_size``.

Two kinds of bad input, decided so that one bad event costs only itself:

- a payload that is not a well-formed batch - not msgpack, not an ``EventBatch`` shape, an
  event of an unknown type, a field of the wrong type or missing, a block hash that is
  neither an int nor a 1..64-byte digest - raises :class:`KVEventDecodeError` (a
  ``ValueError``, and the only error decoding raises): the whole batch is dropped;
- a well-formed ``BlockStored`` whose values are inconsistent (the rules above) decodes as
  an :class:`InvalidEvent` in its place, saying why: the batch's other events still apply.

Decoding is built for throughput: typed msgspec decoders are built once, one per wire form
(array / map batch, array / map events, unsigned hashes / signed-or-digest hashes). A
:class:`BatchDecoder` belongs to one stream and tries the form that decoded its last batch
first, so a stream pays for one attempt per batch; :func:`decode_batch` (no state) starts
with vLLM's array form. An untyped parse is the fallback for rare shapes (mixed event
forms, events missing fields that their form requires).

:func:`encode_batch` writes vLLM's own bytes: ``style="array"`` as vLLM <= 0.10
(array-like batch and events), ``style="map"`` as current vLLM (array-like batch of
tagged map events, ``omit_defaults``: ``lora_id``/``medium``/``lora_name`` always present,
later fields only when set).

:func:`token_block_bytes` is AIBrix's ``convertTokenIDs``: each token id as 4 bytes
big-endian, grouped per block of ``block_size`` tokens.
"""

from __future__ import annotations

import struct
from typing import Any, Literal, Optional, Sequence, Union

import msgspec

from edgellm.protocol.kv_event_fallback import decode_untyped
from edgellm.protocol.kv_event_types import (
    MAX_BLOCK_SIZE,
    AllBlocksCleared,
    BlockRemoved,
    BlockSize,
    BlockStored,
    Event,
    EventBatch,
    Hash,
    InvalidEvent,
    KVEvent,
    KVEventDecodeError,
    Token,
    block_hash_value,
)

__all__ = [
    "AllBlocksCleared",
    "BatchDecoder",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "InvalidEvent",
    "KVEvent",
    "KVEventDecodeError",
    "MAX_BLOCK_SIZE",
    "decode_batch",
    "encode_batch",
    "group_token_ids",
    "token_block_bytes",
]

# --- twins for the other wire forms -------------------------------------------------
# Map events (current vLLM: lora_id/medium/lora_name have no default there) and events with
# signed int64 hashes (engines that use Python's hash()): decoded by their own typed
# decoders, then turned into the canonical events above.


def _stored_fields(hash_t: Any, *, map_form: bool) -> dict[str, Any]:
    required = {"block_hashes": list[hash_t], "parent_block_hash": Optional[hash_t],
                "token_ids": list[Token], "block_size": BlockSize}  # fmt: skip
    vllm_required = ("lora_id", "medium", "lora_name")
    optional = {"lora_id": Optional[int], "medium": Optional[str], "lora_name": Optional[str],
                "extra_keys": Optional[list[Any]], "group_idx": Optional[int],
                "kv_cache_spec_kind": Optional[str],
                "kv_cache_spec_sliding_window": Optional[int]}  # fmt: skip
    fields = [(k, t) for k, t in required.items()]
    for k, t in optional.items():
        fields.append((k, t) if map_form and k in vllm_required else (k, t, None))
    return {"fields": fields}


def _event_types(hash_t: Any, *, map_form: bool, prefix: str) -> tuple[type, type, type]:
    config = dict(omit_defaults=True, gc=False, array_like=not map_form)
    stored = msgspec.defstruct(f"{prefix}BlockStored", **_stored_fields(hash_t, map_form=map_form),
                               tag="BlockStored", **config)  # fmt: skip
    removed_fields = [("block_hashes", list[hash_t])]
    if map_form:
        removed_fields += [("medium", Optional[str]), ("group_idx", Optional[int], None)]
    else:
        removed_fields += [("medium", Optional[str], None), ("group_idx", Optional[int], None)]
    removed = msgspec.defstruct(f"{prefix}BlockRemoved", removed_fields, tag="BlockRemoved", **config)
    cleared = msgspec.defstruct(f"{prefix}AllBlocksCleared", [], tag="AllBlocksCleared", **config)
    return stored, removed, cleared


def _batch_type(name: str, events: tuple[type, ...], *, map_form: bool) -> type:
    return msgspec.defstruct(
        name,
        [("ts", float), ("events", list[Union[events]]), ("data_parallel_rank", Optional[int], None)],
        omit_defaults=True, gc=False, array_like=not map_form,
    )  # fmt: skip


_MAP_EVENTS = _event_types(Hash, map_form=True, prefix="_Map")
# Signed int64 hashes (Python's hash()) or raw digests (current vLLM's sha256 bytes).
_LOOSE_ARRAY_EVENTS = _event_types(Union[int, bytes], map_form=False, prefix="_Loose")
_LOOSE_MAP_EVENTS = _event_types(Union[int, bytes], map_form=True, prefix="_LooseMap")
_MapBlockStored, _MapBlockRemoved, _MapAllBlocksCleared = _MAP_EVENTS
_MapBatch = _batch_type("_MapBatch", _MAP_EVENTS, map_form=True)
# Current vLLM (checked against vLLM 0.33.0's own structs): EventBatch stays array_like,
# only the events became maps.
_ArrayBatchOfMaps = _batch_type("_ArrayBatchOfMaps", _MAP_EVENTS, map_form=False)

_TYPED_FORMS: tuple[tuple[msgspec.msgpack.Decoder, bool], ...] = tuple(
    (msgspec.msgpack.Decoder(t), convert)
    for t, convert in (
        (EventBatch, False),  # vLLM <= 0.10, unsigned hashes: no conversion at all
        (_MapBatch, True),
        (_ArrayBatchOfMaps, True),  # current vLLM
        (_batch_type("_LooseArrayBatch", _LOOSE_ARRAY_EVENTS, map_form=False), True),
        (_batch_type("_LooseMapBatch", _LOOSE_MAP_EVENTS, map_form=True), True),
        (_batch_type("_LooseArrayBatchOfMaps", _LOOSE_MAP_EVENTS, map_form=False), True),
    )
)
# Which forms can match, by the batch's leading msgpack byte (array or map header).
_FORMS_BY_LEAD = {
    **{b: (0, 2, 3, 5) for b in (*range(0x90, 0xA0), 0xDC, 0xDD)},
    **{b: (1, 4) for b in (*range(0x80, 0x90), 0xDE, 0xDF)},
}
_TWINS = (_MAP_EVENTS, _LOOSE_ARRAY_EVENTS, _LOOSE_MAP_EVENTS)
_STORED_TWINS = frozenset(t[0] for t in _TWINS)
_REMOVED_TWINS = frozenset(t[1] for t in _TWINS)
_ENCODER = msgspec.msgpack.Encoder()


class BatchDecoder:
    """Decodes one stream's payloads; remembers the wire form of its last batch (a stream
    keeps its form), which it tries first. Not thread-safe: one per stream."""

    __slots__ = ("_form",)

    def __init__(self) -> None:
        self._form = 0  # index into _TYPED_FORMS

    def decode(self, payload: bytes | bytearray | memoryview) -> EventBatch:
        """As :func:`decode_batch`."""
        batch, self._form = _decode(payload, self._form)
        return batch


def decode_batch(payload: bytes | bytearray | memoryview) -> EventBatch:
    """Decode one published payload into an :class:`EventBatch` of canonical events.

    Raises :class:`KVEventDecodeError` for anything that is not a valid batch.
    """
    return _decode(payload, 0)[0]


def _decode(payload: bytes | bytearray | memoryview, first: int) -> tuple[EventBatch, int]:
    """The batch and the index of the form it decoded as (``first`` when untyped)."""
    form = first
    decoder, convert = _TYPED_FORMS[first]
    try:
        batch = decoder.decode(payload)
    except msgspec.ValidationError:
        batch = None  # well-formed msgpack, another shape: try the other forms
    except Exception as exc:
        # Broken msgpack (truncated, bad opcode, bad UTF-8...) breaks every form alike:
        # reject it at once, so garbage costs one parse, not seven.
        raise KVEventDecodeError(f"not a msgpack document: {exc}") from None
    if batch is None:
        for form in _FORMS_BY_LEAD.get(payload[0] if len(payload) else -1, ()):
            if form == first:
                continue
            decoder, convert = _TYPED_FORMS[form]
            try:
                batch = decoder.decode(payload)
            except Exception:  # not this form (ValidationError; RecursionError when deeper)
                continue
            break
        else:
            return _checked(decode_untyped(payload)), first
    if convert:
        batch = EventBatch(batch.ts, [_canonical(ev) for ev in batch.events],
                           batch.data_parallel_rank)  # fmt: skip
    return _checked(batch), form


def _checked(batch: EventBatch) -> EventBatch:
    """Replace each BlockStored whose token count does not fit its blocks (spec 2 §1)."""
    events = batch.events
    for i, ev in enumerate(events):
        if type(ev) is BlockStored and len(ev.token_ids) != len(ev.block_hashes) * ev.block_size:
            events[i] = InvalidEvent("BlockStored", f"{len(ev.token_ids)} token ids for "
                                     f"{len(ev.block_hashes)} blocks of {ev.block_size}")
    return batch


def _canonical(ev: Any) -> Event:
    kind = type(ev)
    if kind in _STORED_TWINS:
        parent = ev.parent_block_hash
        return BlockStored(
            _normalised(ev.block_hashes),
            None if parent is None else block_hash_value(parent),
            ev.token_ids,
            ev.block_size,
            ev.lora_id,
            ev.medium,
            ev.lora_name,
            ev.extra_keys,
            ev.group_idx,
            ev.kv_cache_spec_kind,
            ev.kv_cache_spec_sliding_window,
        )
    if kind in _REMOVED_TWINS:
        return BlockRemoved(_normalised(ev.block_hashes), ev.medium, ev.group_idx)
    return AllBlocksCleared()


def _normalised(hashes: list[Any]) -> list[int]:
    """Non-negative ints: signed int64 read as unsigned, digests read big-endian."""
    for h in hashes:
        if type(h) is not int or h < 0:
            return [block_hash_value(x) for x in hashes]
    return hashes


# --- encoding ------------------------------------------------------------------------


def encode_batch(batch: EventBatch, style: Literal["array", "map"] = "array") -> bytes:
    """Encode ``batch`` as vLLM does: ``"array"`` (vLLM <= 0.10) or ``"map"`` (current).

    Hashes are written as given; a hash >= 2**64 cannot be a msgpack int and raises
    ``ValueError`` (32-byte digests decode to such ints: re-encode those as bytes yourself).
    Values are not checked (tests send inconsistent events on purpose); an
    :class:`InvalidEvent` raises ``TypeError``.
    """
    for ev in batch.events:
        if not isinstance(ev, KVEvent):
            raise TypeError(f"not a KV event: {type(ev).__name__}")
    try:
        if style == "array":
            return _ENCODER.encode(batch)
        if style == "map":
            return _ENCODER.encode(_ArrayBatchOfMaps(
                batch.ts, [_to_map(ev) for ev in batch.events], batch.data_parallel_rank
            ))  # fmt: skip
    except OverflowError as exc:
        raise ValueError(f"cannot encode batch: {exc}") from None
    raise ValueError(f"unknown style {style!r}: 'array' or 'map'")


def _to_map(ev: Event) -> Any:
    if isinstance(ev, BlockStored):
        return _MapBlockStored(
            ev.block_hashes,
            ev.parent_block_hash,
            ev.token_ids,
            ev.block_size,
            ev.lora_id,
            ev.medium,
            ev.lora_name,
            ev.extra_keys,
            ev.group_idx,
            ev.kv_cache_spec_kind,
            ev.kv_cache_spec_sliding_window,
        )
    if isinstance(ev, BlockRemoved):
        return _MapBlockRemoved(ev.block_hashes, ev.medium, ev.group_idx)
    if isinstance(ev, AllBlocksCleared):
        return _MapAllBlocksCleared()
    raise TypeError(f"not a KV event: {type(ev).__name__}")


# --- token ids -----------------------------------------------------------------------


def group_token_ids(token_ids: Sequence[int], block_size: int) -> list[list[int]]:
    """The full blocks of ``token_ids`` (a trailing partial block is left out)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    full = len(token_ids) - len(token_ids) % block_size
    return [list(token_ids[i : i + block_size]) for i in range(0, full, block_size)]


def token_block_bytes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Each full block of ``token_ids`` as 4-byte big-endian ids (AIBrix ``convertTokenIDs``).

    A trailing partial block is left out. Raises ``ValueError`` for ``block_size < 1`` or a
    token id outside ``0 .. 2**32-1``.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    n = len(token_ids) - len(token_ids) % block_size
    if n == 0:
        return []
    try:
        packed = struct.pack(f">{n}I", *token_ids[:n])
    except struct.error as exc:
        raise ValueError(f"token id out of uint32 range: {exc}") from None
    step = 4 * block_size
    return [packed[i : i + step] for i in range(0, 4 * n, step)]
