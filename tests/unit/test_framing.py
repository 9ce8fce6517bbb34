"""JSON stream framing: newline-delimited and brace-counted input, recovery, size limit."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellm.protocol.framing import Frame, FramingError, JsonStreamFramer


def frames(items):
    return [item.value for item in items if type(item) is Frame]


def errors(items):
    return [item.reason for item in items if type(item) is FramingError]


def feed_all(chunks, max_message=1 << 20):
    framer = JsonStreamFramer(max_message)
    out = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return framer, out


def test_newline_delimited_objects_keep_their_exact_bytes():
    framer, out = feed_all([b'{"a":1}\n{"b": "x y"}\r\n'])
    assert out == [Frame(b'{"a":1}', {"a": 1}), Frame(b'{"b": "x y"}', {"b": "x y"})]
    assert framer.buffered == 0


def test_objects_without_newlines_are_split_by_brace_counting():
    _, out = feed_all([b'{"a":1}{"b":{"c":[1,{"d":2}]}} {"e":3}'])
    assert frames(out) == [{"a": 1}, {"b": {"c": [1, {"d": 2}]}}, {"e": 3}]


def test_braces_and_escaped_quotes_inside_strings_do_not_count():
    text = {"delta": 'a } b { "c" \\ }}}', "x": "{"}
    raw = json.dumps(text).encode()
    _, out = feed_all([raw + raw])
    assert frames(out) == [text, text]
    assert errors(out) == []


def test_pretty_printed_object_over_several_lines():
    body = {"request_id": "1", "data": {"a": [1, {"b": 2}], "s": "x"}}
    _, out = feed_all([json.dumps(body, indent=2).encode() + b"\n"])
    assert frames(out) == [body]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_any_chunking_gives_the_same_messages(size):
    stream = b'{"a":"}\\"{"}\n{"b":[{"c":1}]}{"d":"\\\\"}\n'
    chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
    _, out = feed_all(chunks)
    assert frames(out) == [{"a": '}"{'}, {"b": [{"c": 1}]}, {"d": "\\"}]


def test_non_object_lines_are_one_error_each():
    _, out = feed_all([b'[1,2]\nhello\n"str"\n}\n{"ok":1}\n'])
    assert len(errors(out)) == 4
    assert frames(out) == [{"ok": 1}]


def test_truncated_object_followed_by_a_valid_one_recovers():
    _, out = feed_all([b'{"request_id":"1","data":{"x":1\n{"ok":1}\n'])
    assert len(errors(out)) == 1 and "truncated" in errors(out)[0]
    assert frames(out) == [{"ok": 1}]


@pytest.mark.parametrize("cut", [b'{"request_id":"1","data":', b'{"a":[1,', b'{"a":[', b'{"a":1,"b":'])
def test_a_line_cut_after_a_value_starter_does_not_swallow_the_next_request(cut):
    request = b'{"request_id":"2","work_id":"sys","action":"ping"}'
    _, out = feed_all([cut + b"\n" + request + b"\n" + b'{"ok":1}\n'])
    assert len(errors(out)) == 1 and "truncated" in errors(out)[0]
    assert frames(out) == [json.loads(request), {"ok": 1}]


def test_a_nested_object_on_its_own_line_is_still_part_of_its_message():
    body = b'{"request_id":"1","data":\n{"delta":"x","index":0}\n}\n'
    _, out = feed_all([body])
    assert errors(out) == []
    assert frames(out) == [{"request_id": "1", "data": {"delta": "x", "index": 0}}]


def test_newline_inside_a_string_marks_truncation():
    _, out = feed_all([b'{"a":"unterminated\n{"ok":2}\n'])
    assert len(errors(out)) == 1
    assert frames(out) == [{"ok": 2}]


def test_invalid_json_inside_balanced_braces_is_an_error_and_next_message_survives():
    _, out = feed_all([b'{"a":1,}\n{"a" 1}{"ok":3}\n{"n":NaN}\n'])
    assert len(errors(out)) == 3
    assert frames(out) == [{"ok": 3}]


def test_invalid_utf8_is_an_error_not_an_exception():
    _, out = feed_all([b'{"a":"\xff\xfe"}\n{"ok":1}\n'])
    assert len(errors(out)) == 1
    assert frames(out) == [{"ok": 1}]


def test_oversized_message_is_reported_once_and_skipped_with_flat_memory():
    framer = JsonStreamFramer(max_message=1000)
    out = framer.feed(b'{"big":"')
    for _ in range(200):
        out += framer.feed(b"x" * 500)
        assert framer.buffered <= 1000 + 500
    out += framer.feed(b'"}\n{"ok":1}\n')
    assert errors(out) == ["message larger than 1000 bytes"]
    assert frames(out) == [{"ok": 1}]
    assert framer.buffered == 0


def test_oversized_single_line_and_brace_counted_forms():
    framer = JsonStreamFramer(max_message=64)
    big = json.dumps({"k": "v" * 100}).encode()
    out = framer.feed(big + b"\n" + big + b'{"ok":1}')
    assert len(errors(out)) == 2
    assert frames(out) == [{"ok": 1}]


@pytest.mark.parametrize("pad", [1, 50, 500])
def test_whitespace_counts_toward_the_limit(pad):
    body = b'{"k":' + b" " * (64 + pad) + b'"v"}'
    _, out = feed_all([body + b"\n" + b'{"ok":1}\n'], max_message=64)
    assert errors(out) == ["message larger than 64 bytes"]
    assert frames(out) == [{"ok": 1}]


def test_message_exactly_at_the_limit_passes():
    body = b'{"k":"' + b"v" * (64 - 8) + b'"}'
    assert len(body) == 64
    _, out = feed_all([body + b"\n" + body], max_message=64)
    assert len(frames(out)) == 2


def test_junk_without_newline_is_answered_at_its_first_byte_and_not_stored():
    framer = JsonStreamFramer(max_message=100)
    assert errors(framer.feed(b"garbage " * 100)) == ["not a JSON object"]
    for _ in range(99):
        assert framer.feed(b"garbage " * 100) == []  # the same junk: one answer in all
    assert framer.buffered == 0
    out = framer.feed(b'\n{"ok":1}\n')
    assert out == [Frame(b'{"ok":1}', {"ok": 1})]


def test_incomplete_object_waits_for_more_bytes():
    framer = JsonStreamFramer()
    assert framer.feed(b'{"a":"b\\') == []
    assert framer.feed(b'"c"') == []
    assert frames(framer.feed(b"}")) == [{"a": 'b"c'}]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(objects, min_size=1, max_size=5),
    st.lists(st.sampled_from([b"", b"\n", b" ", b"\r\n"]), min_size=5, max_size=5),
    st.integers(min_value=1, max_value=40),
    st.booleans(),
)
def test_round_trip_any_objects_any_separators_any_chunks(objs, seps, chunk, ascii_only):
    stream = b"".join(
        json.dumps(obj, ensure_ascii=ascii_only).encode() + seps[i % len(seps)]
        for i, obj in enumerate(objs)
    )
    _, out = feed_all([stream[i : i + chunk] for i in range(0, len(stream), chunk)])
    assert errors(out) == []
    assert frames(out) == objs


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises_and_a_following_valid_line_survives(garbage):
    framer = JsonStreamFramer(max_message=256)
    out = framer.feed(garbage)
    # close any open string / object so the final message stands alone
    out += framer.feed(b'"\n\n')
    out += framer.feed(b'{"ok":true}\n')
    assert all(type(item) in (Frame, FramingError) for item in out)
    assert framer.buffered <= 256 + 16
    assert frames(out)[-1] == {"ok": True}


def test_deep_nesting_is_an_error_not_a_crash():
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _, out = feed_all([deep + b'\n{"ok":1}\n'])
    assert len(errors(out)) == 1
    assert frames(out) == [{"ok": 1}]


# -- answered at the first bad byte; incomplete objects wait until expired ---------------------

BAD_AT = [
    (b"{bad json}\n", 1),
    (b'{"a":1,}\n', 7),
    (b'{"n":NaN}\n', 5),
    (b'{"a":"x\\q"}\n', 8),
    (b'{"a":tru e}\n', 8),
    (b'{"a":"\xff"}\n', 6),
    (b"hello\n", 0),
    (b"  ]\n", 2),
]


@pytest.mark.parametrize("stream,bad", BAD_AT)
def test_bad_input_is_answered_at_its_first_bad_byte(stream, bad):
    framer = JsonStreamFramer()
    for i in range(len(stream)):  # one byte at a time: nothing after it is needed
        out = framer.feed(stream[i : i + 1])
        assert len(errors(out)) == (1 if i == bad else 0), (i, out)
        assert frames(out) == []
    assert framer.feed(b'{"ok":1}\n') == [Frame(b'{"ok":1}', {"ok": 1})]
    _, whole = feed_all([stream + b'{"ok":1}\n'])  # the same in one piece
    assert len(errors(whole)) == 1 and frames(whole) == [{"ok": 1}]


def test_an_object_cut_by_the_next_one_is_answered_when_that_one_begins():
    framer = JsonStreamFramer()
    assert framer.feed(b'{"request_id":"1","data":{"x":1') == []
    out = framer.feed(b'{"ok":1}')  # no newline anywhere
    assert errors(out) == ["truncated message (a new object starts inside it)"]
    assert frames(out) == [{"ok": 1}]


def test_an_incomplete_object_waits_until_expired():
    framer = JsonStreamFramer()
    assert framer.feed(b'{"request_id":"1","a":1\n') == []  # objects may span lines
    assert framer.pending
    assert errors(framer.expire()) == ["incomplete message: the rest of it never came"]
    assert not framer.pending and framer.buffered == 0
    assert framer.expire() == []
    assert framer.feed(b'{"ok":1}\n') == [Frame(b'{"ok":1}', {"ok": 1})]
    assert not framer.pending


def test_an_object_answered_as_too_large_is_not_answered_again_when_expired():
    framer = JsonStreamFramer(max_message=64)
    assert errors(framer.feed(b'{"k":"' + b"v" * 100)) == ["message larger than 64 bytes"]
    assert framer.pending and framer.buffered <= 64
    assert framer.expire() == []
    assert frames(framer.feed(b'{"ok":1}\n')) == [{"ok": 1}]


def test_the_rest_of_a_too_large_object_is_still_validated():
    framer = JsonStreamFramer(max_message=64)
    out = framer.feed(b'{"k":"' + b"v" * 100 + b'", x}\n{"ok":1}\n')
    assert errors(out) == ["message larger than 64 bytes"]  # the bad byte adds no answer
    assert frames(out) == [{"ok": 1}]
