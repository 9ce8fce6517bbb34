"""The untyped fallback of the KV event batch decoder: any array or map shape the typed
decoders of :mod:`edgellm.protocol.kv_events` did not take (mixed event forms, events
missing fields their form requires), parsed field by field into canonical events, with
every malformed part a :class:`~edgellm.protocol.kv_event_types.KVEventDecodeError`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from edgellm.protocol.kv_event_types import (
    MAX_BLOCK_SIZE,
    MAX_TOKEN,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    InvalidEvent,
    KVEventDecodeError,
    block_hash_value,
)

_RAW_DECODER = msgspec.msgpack.Decoder()

_STORED_FIELDS = tuple(BlockStored.__struct_fields__)
_REMOVED_FIELDS = tuple(BlockRemoved.__struct_fields__)
_BATCH_FIELDS = tuple(EventBatch.__struct_fields__)


def decode_untyped(payload: Any) -> EventBatch:
    """Decode ``payload`` without a schema; raises :class:`KVEventDecodeError`."""
    try:
        raw = _RAW_DECODER.decode(payload)
    except Exception as exc:
        raise KVEventDecodeError(f"not a msgpack document: {exc}") from None
    try:
        ts, events, rank = _fields(raw, _BATCH_FIELDS, required=2, what="EventBatch")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)):
            raise KVEventDecodeError(f"EventBatch.ts must be a number, got {ts!r:.80}")
        if not isinstance(events, list):
            raise KVEventDecodeError("EventBatch.events must be an array")
        rank = _opt_int(rank, "data_parallel_rank")
        return EventBatch(float(ts), [_parse_event(ev) for ev in events], rank)
    except KVEventDecodeError:
        raise
    except Exception as exc:  # a shape this parser did not foresee is still malformed
        raise KVEventDecodeError(f"malformed event batch: {exc!r:.200}") from None


def _fields(raw: Any, names: tuple[str, ...], *, required: int, what: str) -> list[Any]:
    """The values of ``names`` from an array (positional) or a map (by name)."""
    if isinstance(raw, list):
        values = raw[: len(names)]
    elif isinstance(raw, dict):
        values = []
        for name in names:
            if name not in raw:
                break
            values.append(raw[name])
    else:
        raise KVEventDecodeError(f"{what} must be an array or a map")
    if len(values) < required:
        raise KVEventDecodeError(f"{what} needs at least {required} fields: {names[:required]}")
    return values + [None] * (len(names) - len(values))


def _parse_event(raw: Any) -> Event | InvalidEvent:
    if isinstance(raw, list):
        if not raw:
            raise KVEventDecodeError("empty event array")
        tag, body = raw[0], raw[1:]
    elif isinstance(raw, dict):
        tag = raw.get("type")
        body = raw
    else:
        raise KVEventDecodeError("an event must be a tagged array or a map with 'type'")
    if tag == "BlockStored":
        (hashes, parent, tokens, block_size, lora_id, medium, lora_name, extra_keys,
         group_idx, spec_kind, spec_window) = _fields(
            body, _STORED_FIELDS, required=4, what="BlockStored")  # fmt: skip
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise KVEventDecodeError(f"block_size must be an int, got {block_size!r:.40}")
        if extra_keys is not None and not isinstance(extra_keys, list):
            raise KVEventDecodeError("extra_keys must be an array or nil")
        event = BlockStored(
            _hash_list(hashes),
            None if parent is None else block_hash_value(parent),
            _token_list(tokens),
            block_size,
            _opt_int(lora_id, "lora_id"),
            _opt_str(medium, "medium"),
            _opt_str(lora_name, "lora_name"),
            extra_keys,
            _opt_int(group_idx, "group_idx"),
            _opt_str(spec_kind, "kv_cache_spec_kind"),
            _opt_int(spec_window, "kv_cache_spec_sliding_window"),
        )
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            return InvalidEvent("BlockStored", f"block_size {block_size} not in 1..{MAX_BLOCK_SIZE}")
        if not all(0 <= t <= MAX_TOKEN for t in event.token_ids):
            return InvalidEvent("BlockStored", "a token id outside 0..2**32-1")
        return event
    if tag == "BlockRemoved":
        hashes, medium, group_idx = _fields(
            body, _REMOVED_FIELDS, required=1, what="BlockRemoved"
        )
        return BlockRemoved(
            _hash_list(hashes), _opt_str(medium, "medium"), _opt_int(group_idx, "group_idx")
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise KVEventDecodeError(f"unknown event type {tag!r:.80}")


def _hash_list(raw: Any) -> list[int]:
    if not isinstance(raw, list):
        raise KVEventDecodeError("block_hashes must be an array")
    return [block_hash_value(h) for h in raw]


def _token_list(raw: Any) -> list[int]:
    if not isinstance(raw, list):
        raise KVEventDecodeError("token_ids must be an array")
    for t in raw:
        if type(t) is not int:
            raise KVEventDecodeError(f"token id {t!r:.40} is not an int")
    return raw


def _opt_int(v: Any, name: str) -> int | None:
    if v is None or (type(v) is int):
        return v
    raise KVEventDecodeError(f"{name} must be an int or nil, got {type(v).__name__}")


def _opt_str(v: Any, name: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise KVEventDecodeError(f"{name} must be a string or nil, got {type(v).__name__}")
