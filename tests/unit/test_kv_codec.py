"""The KV event codec: vLLM's wire forms in, canonical events out; malformed -> one error."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.protocol import kv_events
from edgellm.protocol.kv_events import (
    BatchDecoder,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    MAX_BLOCK_SIZE,
    EventBatch,
    InvalidEvent,
    KVEventDecodeError,
    decode_batch,
    encode_batch,
    group_token_ids,
    token_block_bytes,
)

_pack = msgspec.msgpack.encode


def _sample_batch(rank: int | None = 0) -> EventBatch:
    return EventBatch(
        ts=1712345678.25,
        events=[
            BlockStored([11, 12], None, list(range(8)), 4, None, "GPU", None),
            BlockStored([13], 12, [8, 9, 10, 11], 4, 7, "GPU", "adapter", group_idx=2),
            BlockRemoved([11, 2**64 - 1], "GPU"),
            AllBlocksCleared(),
        ],
        data_parallel_rank=rank,
    )


@pytest.mark.parametrize("style", ["array", "map"])
@pytest.mark.parametrize("rank", [None, 0, 3])
def test_round_trip_in_both_styles(style, rank):
    batch = _sample_batch(rank)
    assert decode_batch(encode_batch(batch, style)) == batch


def test_array_style_is_vllm_array_like_layout():
    batch = EventBatch(2.0, [BlockStored([1], None, [5, 6], 2, None, "GPU", None)], 1)
    raw = msgspec.msgpack.decode(encode_batch(batch, "array"))
    assert raw == [
        2.0,
        [["BlockStored", [1], None, [5, 6], 2, None, "GPU", None, None, None, None, None]],
        1,
    ]


def test_map_style_is_current_vllm_layout():
    """Current vLLM: array-like batch (rank nil when unset), tagged map events whose
    lora_id/medium/lora_name are always written and later fields only when set."""
    batch = EventBatch(
        2.0,
        [
            BlockStored([1], None, [5, 6], 2, None, "GPU", None),
            BlockRemoved([1], None, group_idx=4),
            AllBlocksCleared(),
        ],
    )
    raw = msgspec.msgpack.decode(encode_batch(batch, "map"))
    assert raw == [
        2.0,
        [
            {
                "type": "BlockStored",
                "block_hashes": [1],
                "parent_block_hash": None,
                "token_ids": [5, 6],
                "block_size": 2,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
            },
            {"type": "BlockRemoved", "block_hashes": [1], "medium": None, "group_idx": 4},
            {"type": "AllBlocksCleared"},
        ],
        None,
    ]


def test_unknown_style_is_rejected():
    with pytest.raises(ValueError):
        encode_batch(_sample_batch(), "yaml")  # type: ignore[arg-type]


def test_oldest_vllm_form_without_rank_or_trailing_fields():
    payload = _pack([3.5, [["BlockStored", [1, 2], None, [1, 2, 3, 4], 2, None], ["BlockRemoved", [1]]]])
    batch = decode_batch(payload)
    assert batch == EventBatch(
        3.5, [BlockStored([1, 2], None, [1, 2, 3, 4], 2, None), BlockRemoved([1])], None
    )


def test_unknown_extra_fields_are_ignored_in_arrays_and_maps():
    stored_array = ["BlockStored", [1], 9, [1, 2], 2, None, "GPU", None, None, 0, "full", None,
                    "future-1", {"future": 2}]  # fmt: skip
    removed_map = {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "new": [1]}
    batch = decode_batch(_pack([1.0, [stored_array, removed_map], 0, "trailing"]))
    assert batch.events == [
        BlockStored([1], 9, [1, 2], 2, None, "GPU", None, None, 0, "full", None),
        BlockRemoved([1], "GPU"),
    ]
    map_batch = {"ts": 1, "events": [removed_map], "data_parallel_rank": 2, "other": 1}
    assert decode_batch(_pack(map_batch)) == EventBatch(1.0, [BlockRemoved([1], "GPU")], 2)


def test_map_events_missing_the_later_required_fields_still_decode():
    payload = _pack({"ts": 1.0, "events": [{"type": "BlockStored", "block_hashes": [4],
                     "parent_block_hash": None, "token_ids": [1], "block_size": 1}]})  # fmt: skip
    assert decode_batch(payload).events == [BlockStored([4], None, [1], 1)]


def test_array_batch_of_map_events():
    event = {"type": "BlockRemoved", "block_hashes": [5], "medium": None}
    assert decode_batch(_pack([1.0, [event]])).events == [BlockRemoved([5])]


def test_signed_int64_hashes_read_as_unsigned():
    payload = _pack([1.0, [["BlockStored", [-1, -(2**63), 5], -2, [0] * 3, 1, None]]])
    (event,) = decode_batch(payload).events
    assert event.block_hashes == [2**64 - 1, 2**63, 5]
    assert event.parent_block_hash == 2**64 - 2
    assert decode_batch(_pack([1.0, [["BlockRemoved", [-3]]]])).events[0].block_hashes == [
        2**64 - 3
    ]


def test_bytes_digests_become_big_endian_ints():
    digest8 = (2**64 - 5).to_bytes(8, "big")
    digest32 = bytes(range(32))
    payload = _pack([1.0, [["BlockStored", [digest8, digest32], digest8, [1, 2], 1, None, None, None]]])
    (event,) = decode_batch(payload).events
    assert event.block_hashes == [2**64 - 5, int.from_bytes(digest32, "big")]
    assert event.parent_block_hash == 2**64 - 5
    # An 8-byte digest and the u64 an int-hash engine sends name the same block.
    assert decode_batch(_pack([1.0, [["BlockRemoved", [digest8]]]])).events[0].block_hashes == [
        2**64 - 5
    ]


def test_forms_can_alternate_between_payloads():
    """A decoder remembers the last form only as a speed hint, never as a constraint."""
    batch = _sample_batch()
    decoder = BatchDecoder()
    for style in ["map", "array", "array", "map", "array"]:
        assert decode_batch(encode_batch(batch, style)) == batch
        assert decoder.decode(encode_batch(batch, style)) == batch


def test_decoding_leaves_the_module_as_it_was():
    """Per-stream state lives in each stream's BatchDecoder: decoding two streams of
    different vLLM versions in turns rebinds nothing in the codec module."""
    batch = _sample_batch()
    before = {name: id(value) for name, value in vars(kv_events).items()}
    old, new = BatchDecoder(), BatchDecoder()
    for _ in range(3):
        assert old.decode(encode_batch(batch, "array")) == batch
        assert new.decode(encode_batch(batch, "map")) == batch
        assert decode_batch(encode_batch(batch, "map")) == batch
    assert {name: id(value) for name, value in vars(kv_events).items()} == before


def test_accepts_bytearray_and_memoryview():
    payload = encode_batch(_sample_batch())
    assert decode_batch(bytearray(payload)) == decode_batch(memoryview(payload))


@pytest.mark.parametrize(
    "obj",
    [
        [],
        [1.0],
        ["ts", []],
        [True, []],
        [1.0, {}],
        [1.0, [[]]],
        [1.0, [["Nope", [1]]]],
        [1.0, [{"block_hashes": [1]}]],
        [1.0, [["BlockStored", [1], None, [1]]]],  # missing block_size
        [1.0, [["BlockStored", [1], None, [1], True, None]]],
        [1.0, [["BlockStored", [1.5], None, [1], 1, None]]],
        [1.0, [["BlockStored", [1], "p", [1], 1, None]]],
        [1.0, [["BlockStored", [1], None, ["a"], 1, None]]],
        [1.0, [["BlockStored", [1], None, [1], 1, "lora"]]],
        [1.0, [["BlockStored", [b""], None, [1], 1, None]]],
        [1.0, [["BlockStored", [b"x" * 65], None, [1], 1, None]]],
        [1.0, [["BlockRemoved", "notalist"]]],
        [1.0, [["BlockRemoved", [1], 5]]],
        [1.0, [], "rank"],
        {"events": []},
        "text",
        7,
        None,
    ],
)
def test_malformed_payloads_raise_the_decode_error(obj):
    with pytest.raises(KVEventDecodeError):
        decode_batch(_pack(obj))


_GOOD = ["BlockStored", [5, 6], None, list(range(8)), 4, None, "GPU", None]


@pytest.mark.parametrize(
    "bad",
    [
        ["BlockStored", [7], None, [1, 2, 3], 1_000_000, None],  # the poisoning block size
        ["BlockStored", [7], None, [1] * (MAX_BLOCK_SIZE + 1), MAX_BLOCK_SIZE + 1, None],
        ["BlockStored", [7], None, [1], 0, None],
        ["BlockStored", [7], None, [1], -3, None],
        ["BlockStored", [7, 8], None, [1, 2, 3], 2, None],  # 3 tokens for 2 blocks of 2
        ["BlockStored", [7], None, [1, 2, 3], 2, None],
        ["BlockStored", [], None, [1, 2], 2, None],
        ["BlockStored", [-7], None, [1], 2, None],  # signed hash form, too few tokens
        ["BlockStored", [b"\x01" * 32], None, [1, 2, 3], 2, None],  # digest form
        ["BlockStored", [7], None, [2**32, 1], 2, None],
        ["BlockStored", [7], None, [-1, 1], 2, None],
        {"type": "BlockStored", "block_hashes": [7], "parent_block_hash": None,
         "token_ids": [1, 2, 3], "block_size": 2, "lora_id": None, "medium": None,
         "lora_name": None},  # map form
    ],
)  # fmt: skip
@pytest.mark.parametrize("batch_form", ["array", "map"])
def test_inconsistent_block_stored_is_an_invalid_event_and_the_rest_applies(bad, batch_form):
    removed = ["BlockRemoved", [5], "GPU"]
    raw = ([1.0, [_GOOD, bad, removed]] if batch_form == "array"
           else {"ts": 1.0, "events": [_GOOD, bad, removed]})  # fmt: skip
    good, invalid, rest = decode_batch(_pack(raw)).events
    assert good == BlockStored([5, 6], None, list(range(8)), 4, None, "GPU", None)
    assert isinstance(invalid, InvalidEvent) and invalid.kind == "BlockStored" and invalid.reason
    assert rest == BlockRemoved([5], "GPU")


def test_block_size_limit_itself_is_valid_and_invalid_events_do_not_encode():
    big = BlockStored([1], None, [3] * MAX_BLOCK_SIZE, MAX_BLOCK_SIZE, None, "GPU", None)
    assert decode_batch(encode_batch(EventBatch(1.0, [big]))).events == [big]
    for style in ("array", "map"):
        with pytest.raises(TypeError):
            encode_batch(EventBatch(1.0, [InvalidEvent("BlockStored", "x")]), style)


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x93\x01", b"\xdd\xff\xff\xff\xff", b"\x91" * 5000])
def test_broken_msgpack_raises_the_decode_error(payload):
    with pytest.raises(KVEventDecodeError):
        decode_batch(payload)


def test_decode_error_is_a_value_error():
    assert issubclass(KVEventDecodeError, ValueError)


def test_encoding_a_hash_over_u64_is_a_value_error():
    batch = EventBatch(1.0, [BlockRemoved([2**70])])
    with pytest.raises(ValueError):
        encode_batch(batch)


def test_token_block_bytes_matches_convert_token_ids():
    assert token_block_bytes([1, 2, 3, 4], 2) == [bytes([0, 0, 0, 1, 0, 0, 0, 2]),
                                                  bytes([0, 0, 0, 3, 0, 0, 0, 4])]  # fmt: skip
    assert token_block_bytes([0xDEADBEEF, 7, 9], 2) == [b"\xde\xad\xbe\xef\x00\x00\x00\x07"]
    assert token_block_bytes([1], 2) == []
    assert group_token_ids([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4]]


@pytest.mark.parametrize("tokens", [[-1, 2], [2**32, 1]])
def test_token_block_bytes_rejects_out_of_range_ids(tokens):
    with pytest.raises(ValueError):
        token_block_bytes(tokens, 2)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError):
        token_block_bytes([1], 0)
    with pytest.raises(ValueError):
        group_token_ids([1], 0)


def test_public_names():
    assert set(kv_events.__all__) == {
        "AllBlocksCleared", "BatchDecoder", "BlockRemoved", "BlockStored", "EventBatch",
        "InvalidEvent", "KVEvent", "KVEventDecodeError", "MAX_BLOCK_SIZE", "decode_batch",
        "encode_batch", "group_token_ids", "token_block_bytes",
    }  # fmt: skip


# --- fuzzing ---------------------------------------------------------------------------

_hash = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.binary(min_size=8, max_size=8),
    st.binary(min_size=32, max_size=32),
)
_opt_str = st.none() | st.text(max_size=8)
_opt_int = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def _stored(draw, as_map: bool):
    n = draw(st.integers(0, 4))
    bs = draw(st.integers(1, 4))
    fields = [
        draw(st.lists(_hash, min_size=n, max_size=n)),
        draw(st.none() | _hash),
        draw(st.lists(st.integers(0, 2**32 - 1), min_size=n * bs, max_size=n * bs)),
        bs,
        draw(_opt_int),
        draw(_opt_str),
        draw(_opt_str),
    ]
    if as_map:
        names = BlockStored.__struct_fields__
        return {"type": "BlockStored", **dict(zip(names, fields))}
    return ["BlockStored", *fields]


@st.composite
def _removed(draw, as_map: bool):
    fields = [draw(st.lists(_hash, max_size=4)), draw(_opt_str)]
    if as_map:
        return {"type": "BlockRemoved", "block_hashes": fields[0], "medium": fields[1]}
    return ["BlockRemoved", *fields]


_event = st.booleans().flatmap(
    lambda as_map: st.one_of(
        _stored(as_map),
        _removed(as_map),
        st.just({"type": "AllBlocksCleared"} if as_map else ["AllBlocksCleared"]),
    )
)


@st.composite
def _valid_raw_batch(draw):
    events = draw(st.lists(_event, max_size=5))
    ts = draw(st.floats(allow_nan=False, allow_infinity=False))
    rank = draw(st.none() | st.integers(0, 8))
    if draw(st.booleans()):
        return {"ts": ts, "events": events, **({} if rank is None else {"data_parallel_rank": rank})}
    return [ts, events] + ([] if rank is None and draw(st.booleans()) else [rank])


def _expected_hash(h):
    if isinstance(h, bytes):
        return int.from_bytes(h, "big")
    return h + 2**64 if h < 0 else h


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_raw_batch())
def test_every_valid_form_decodes_to_normalised_hashes(raw):
    batch = decode_batch(_pack(raw))
    raw_events = raw["events"] if isinstance(raw, dict) else raw[1]
    assert len(batch.events) == len(raw_events)
    for event, raw_event in zip(batch.events, raw_events):
        if isinstance(raw_event, dict):
            hashes = raw_event.get("block_hashes")
        else:
            hashes = raw_event[1] if len(raw_event) > 1 else None
        assert type(event).__name__ == (
            raw_event["type"] if isinstance(raw_event, dict) else raw_event[0])  # fmt: skip
        if hashes is not None:
            assert event.block_hashes == [_expected_hash(h) for h in hashes]
    # A decoded batch whose hashes fit in u64 re-encodes and decodes to itself.
    if all(h < 2**64 for ev in batch.events for h in getattr(ev, "block_hashes", [])) and all(
        getattr(ev, "parent_block_hash", None) is None or ev.parent_block_hash < 2**64
        for ev in batch.events
    ):
        for style in ("array", "map"):
            assert decode_batch(encode_batch(batch, style)) == batch


_msgpack_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=40)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type", "ts"]),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(
        st.sampled_from(["type", "ts", "events", "block_hashes", "token_ids", "block_size",
                         "parent_block_hash", "data_parallel_rank", "x"]), children, max_size=6),
    max_leaves=40,
)  # fmt: skip


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(_msgpack_value)
def test_arbitrary_msgpack_either_decodes_or_raises_the_decode_error(value):
    try:
        batch = decode_batch(_pack(value))
    except KVEventDecodeError:
        return
    assert isinstance(batch, EventBatch)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_either_decode_or_raise_the_decode_error(payload):
    try:
        decode_batch(payload)
    except KVEventDecodeError:
        pass


def _mutate(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[pos] = rng.randrange(256)
        elif op == 1 and data:
            del data[pos : pos + rng.randint(1, 8)]
        elif op == 2:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            data = data[: rng.randrange(len(data) + 1)]
        elif data:
            data[pos] = rng.choice([0xC0, 0xC1, 0xDC, 0xDD, 0xDE, 0xDF, 0xD3, 0xCF, 0xC4, 0xFF])
    return bytes(data)


def test_mutated_valid_payloads_decode_or_raise_the_decode_error():
    rng = random.Random(1234)
    seeds = [encode_batch(_sample_batch(rank), style) for style in ("array", "map")
             for rank in (None, 1)]  # fmt: skip
    decoded = failed = 0
    for i in range(20_000):
        try:
            decode_batch(_mutate(rng, seeds[i % len(seeds)]))
            decoded += 1
        except KVEventDecodeError:
            failed += 1
    # Both outcomes occur: the mutations reach past the first byte into the events.
    assert decoded > 0 and failed > 0
