"""What bench/fuzz.py's framer target checks, on the inputs it found (kept as regression
cases): the same bytes frame the same however TCP cuts them, and a line that is one whole
request is read as that request after any garbage."""

from __future__ import annotations

import json

import pytest

from edgellm.protocol.framing import Frame, FramingError, JsonStreamFramer

REQUEST = {"request_id": "f", "work_id": "sys", "action": "ping"}
LINE = b"\n" + json.dumps(REQUEST, separators=(",", ":")).encode() + b"\n"


def _frames(stream: bytes, chunk: int, max_message: int = 1 << 20) -> list:
    framer = JsonStreamFramer(max_message)
    out = []
    for i in range(0, len(stream), chunk):
        out += framer.feed(stream[i : i + chunk])
    return out


@pytest.mark.parametrize("stream", [
    b'{"request_id":"w","w\x00:"}"}{"b":[\r\n{"1ork_id":null,"action":"ping"}\n',
    b'{"b":[\n{"request_id":"1","work_id":"sys","action":"ping"}\n',
])  # fmt: skip
def test_the_same_bytes_frame_the_same_however_they_are_cut(stream):
    whole = _frames(stream, len(stream))
    for chunk in (1, 2, 6):
        assert _frames(stream, chunk) == whole, chunk


def test_a_whole_request_line_is_read_after_any_garbage():
    garbage = (b'{{"a\xff\xfcz"\\ud83d\\ude00a":\x19}"}{"b":[1,{"c":1}"\\ud83d\xc3\xa90:@\x03]}\n'
               b'  [1]\n}work_id":)"\x96\x86\x8c\xdd,"action":"work_id":"sys",0action":""ping"}'
               b'\x81"\n}\x80\x05{"request_i\x00\x00\x00\x00"m1", "work\xff\xfcz"\\ud83d\\')
    framer = JsonStreamFramer(64 + 255 * 8)
    got = framer.feed(garbage) + framer.feed(LINE)
    assert type(got[-1]) is Frame and got[-1].value == REQUEST, got[-3:]


def _held(stream: bytes, chunk: int, max_message: int) -> int:
    """Most bytes the framer held beyond the chunk just fed."""
    framer = JsonStreamFramer(max_message)
    most = 0
    for i in range(0, len(stream), chunk):
        piece = stream[i : i + chunk]
        framer.feed(piece)
        most = max(most, framer.buffered - len(piece))
    return most


def test_a_long_number_in_a_message_over_the_limit_is_not_held():
    # finding of bench/fuzz.py: a cut number was read again from its start, so a message
    # skipped for its size still held every digit of a number that kept on coming
    stream = b'{"c":1e' + b"5" * 10_000 + b"}"
    assert _frames(stream, 7, 64) == [FramingError("message larger than 64 bytes")]
    assert _held(stream, 7, 64) <= 65


def test_a_message_waiting_on_the_next_line_is_not_held_past_its_limit():
    # finding of bench/fuzz.py: while the line after a "{" first on its line was still
    # coming, the message before it was held whole, past the size limit
    stream = b'{"a": [\n  1,\n' + LINE[1:]
    whole = _frames(stream, len(stream), 64)
    assert whole[0] == FramingError("truncated message (a new object starts inside it)")
    assert type(whole[-1]) is Frame and whole[-1].value == REQUEST
    for chunk in (1, 3, 5):
        assert _frames(stream, chunk, 64) == whole
        assert _held(stream, chunk, 64) <= 65
