"""JSON stream framing of the unit manager's TCP front door (spec 1 §3.3).

Clients send JSON objects over a byte stream. Most end each object with ``\\n``; some
(microcontrollers, the C++ original's own clients) send objects back to back with no
separator, or pretty-printed over several lines. :class:`JsonStreamFramer` accepts all of
them and cuts the stream into messages, each either a :class:`Frame` (the object's exact
bytes and its decoded value) or a :class:`FramingError` (a reason; the caller answers it
with error -2). Data in, data out: no sockets, no clocks.

How a message is found:

- Fast path: at a message boundary, if the rest of the line decodes as one JSON object, that
  line is the message (one decode, reused by the caller: nothing is parsed twice).
- Otherwise braces are counted, outside strings only (a ``\\"`` escape does not end a
  string), so ``{"a":"}"}{"b":1}`` is two messages whatever the newlines.
- Anything outside an object up to the end of its line (or the next ``{``) is one error:
  ``[1,2]``, ``hello``, a stray ``}``.

Recovery (one bad message never swallows the next ones):

- a raw newline inside a string cannot occur in valid JSON (it must be escaped), so it marks
  the message as truncated: an error, and framing restarts after the newline;
- a ``{`` that cannot continue the current object (JSON allows one only after ``:``, ``,``
  or ``[``) marks the current message as truncated: an error, and framing restarts at
  that ``{``, e.g. ``{"a":1`` followed by ``{"request_id":...}``; so does a line that is a
  whole request on its own (``{"a":`` then a newline and ``{"request_id":...}``);
- a message longer than ``max_message`` bytes is answered with one error as soon as the
  limit is crossed (whitespace counts); its remaining bytes are skipped (not stored) up to
  its end.

Memory is flat: the framer keeps at most the current message (``<= max_message`` bytes)
plus the unread part of the last chunk fed to it.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import msgspec

__all__ = ["DEFAULT_MAX_MESSAGE", "Frame", "FramingError", "JsonStreamFramer", "decode_object"]

DEFAULT_MAX_MESSAGE = 1 << 20
"""Default per-message size limit: 1 MiB."""

_decoder = msgspec.json.Decoder()

_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_JUNK_END = re.compile(rb"[\n{]")
_IN_STRING = re.compile(rb'[\\"\n]')
_IN_OBJECT = re.compile(rb'[{}"]')
_SPACE = b" \t\r\n"
_VALUE_STARTERS = b":,["

# Scanner states.
_IDLE = 0  # between messages
_OBJECT = 1  # inside an object being kept
_SKIP = 2  # inside an object over the size limit: scanned, not kept
_JUNK = 3  # non-object bytes between messages


class Frame(NamedTuple):
    """One complete JSON object: its bytes as received and its decoded value (a dict)."""

    raw: bytes
    value: dict[str, Any]


class FramingError(NamedTuple):
    """Bytes that are not a usable JSON object; ``reason`` says why, for the client."""

    reason: str


def decode_object(raw: bytes | bytearray | memoryview) -> dict[str, Any] | str:
    """Decode ``raw`` as one JSON object: the dict, or a reason string when it is not one."""
    try:
        value = _decoder.decode(raw)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # bad UTF-8, deep nesting
        return f"invalid JSON: {exc}"
    if type(value) is not dict:
        return f"expected a JSON object, got {type(value).__name__}"
    return value


class JsonStreamFramer:
    """Cuts a byte stream into JSON objects. Feed it chunks; it returns what they completed."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE):
        if max_message < 2:
            raise ValueError("max_message must allow at least '{}'")
        self.max_message = max_message
        self._buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = 0  # first byte of the current object or junk run
        self._state = _IDLE
        self._depth = 0
        self._in_string = False

    @property
    def buffered(self) -> int:
        """Bytes held right now (for memory checks)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | FramingError]:
        """Add ``data``; return the messages and errors it completed, in stream order."""
        out: list[Frame | FramingError] = []
        self._buf += data
        self._scan(out)
        self._compact()
        return out

    # -- scanning ---------------------------------------------------------------------------

    def _scan(self, out: list[Frame | FramingError]) -> None:
        buf = self._buf
        end = len(buf)
        while self._pos < end:
            state = self._state
            if state == _IDLE:
                m = _NON_SPACE.search(buf, self._pos)
                if m is None:
                    self._pos = end
                    return
                pos = m.start()
                if buf[pos] != 0x7B:  # not "{"
                    self._state = _JUNK
                    self._start = self._pos = pos
                    continue
                if self._fast_line(pos, out):
                    continue
                self._state = _OBJECT
                self._start = self._pos = pos
                self._depth = 0
                self._in_string = False
            elif state == _JUNK:
                m = _JUNK_END.search(buf, self._pos)
                if m is None:
                    self._pos = end
                    return
                out.append(FramingError("not a JSON object"))
                self._state = _IDLE
                self._pos = m.start() + (1 if buf[m.start()] == 0x0A else 0)
            else:
                self._scan_object(out)
                if self._state != _IDLE:
                    return  # the object needs more bytes

    def _fast_line(self, pos: int, out: list[Frame | FramingError]) -> bool:
        """At a boundary: take the line from ``pos`` if it is exactly one JSON object."""
        buf = self._buf
        nl = buf.find(b"\n", pos)
        if nl < 0 or nl - pos > self.max_message:
            return False
        stop = nl
        while stop > pos and buf[stop - 1] in _SPACE:
            stop -= 1
        if buf[stop - 1] != 0x7D:  # a complete object ends in "}"
            return False
        raw = bytes(buf[pos:stop])
        try:
            value = _decoder.decode(raw)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return False
        if type(value) is not dict:
            return False
        out.append(Frame(raw, value))
        self._pos = nl + 1
        return True

    def _scan_object(self, out: list[Frame | FramingError]) -> None:
        buf = self._buf
        end = len(buf)
        pos = self._pos
        while pos < end:
            if self._in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    pos = end
                    break
                p = m.start()
                c = buf[p]
                if c == 0x5C:  # backslash: skip the escaped byte
                    if p + 1 >= end:
                        pos = p  # wait for the escaped byte
                        break
                    pos = p + 2
                elif c == 0x22:
                    self._in_string = False
                    pos = p + 1
                else:  # raw newline inside a string: the message was cut short
                    self._fail(out, "truncated message (newline inside a string)")
                    self._pos = p + 1
                    return
            else:
                m = _IN_OBJECT.search(buf, pos)
                if m is None:
                    pos = end
                    break
                p = m.start()
                c = buf[p]
                if c == 0x22:
                    self._in_string = True
                    pos = p + 1
                elif c == 0x7B:
                    if self._depth > 0 and (not self._may_open(p) or self._new_request_line(p)):
                        self._fail(out, "truncated message (a new object starts inside it)")
                        self._pos = p
                        return
                    self._depth += 1
                    pos = p + 1
                else:
                    self._depth -= 1
                    pos = p + 1
                    if self._depth == 0:
                        self._pos = pos
                        if self._state == _OBJECT and pos - self._start > self.max_message:
                            self._fail(out, f"message larger than {self.max_message} bytes")
                        else:
                            self._finish(out)
                        return
            if self._state == _OBJECT and pos - self._start > self.max_message:
                self._pos = pos
                self._overflow(out)
                pos = self._pos
                end = len(buf)
        self._pos = pos
        if self._state == _OBJECT and pos - self._start > self.max_message:
            self._overflow(out)

    def _may_open(self, p: int) -> bool:
        """Whether a ``{`` at ``p`` can continue the current object (follows ``:`` ``,`` ``[``).

        Looks back over whitespace within the kept bytes; in skip mode the bytes before may
        be gone, and then the ``{`` is given the benefit of the doubt.
        """
        buf = self._buf
        q = p - 1
        lowest = self._start if self._state == _OBJECT else 0
        while q >= lowest and buf[q] in _SPACE:
            q -= 1
        if q < lowest:
            return True
        return buf[q] in _VALUE_STARTERS

    def _new_request_line(self, p: int) -> bool:
        """Whether the ``{`` at ``p`` starts a line that is a whole request on its own.

        Inside an object a ``{`` after ``:`` ``,`` ``[`` is legal, so a message cut short
        right after one of those would swallow the next request. A client that ends its
        messages with newlines shows where one begins: a line that decodes by itself as an
        object with a ``request_id`` or ``action`` is taken as a new message, and the one
        before it as truncated.
        """
        buf = self._buf
        q = p - 1
        while q >= self._start and buf[q] in b" \t\r":
            q -= 1
        if q < self._start or buf[q] != 0x0A:
            return False
        nl = buf.find(b"\n", p)
        if nl < 0 or nl - p > self.max_message:
            return False
        value = decode_object(bytes(buf[p:nl]).rstrip())
        return type(value) is dict and ("request_id" in value or "action" in value)

    def _finish(self, out: list[Frame | FramingError]) -> None:
        if self._state == _OBJECT:
            raw = bytes(self._buf[self._start : self._pos])
            value = decode_object(raw)
            if type(value) is dict:
                out.append(Frame(raw, value))
            else:
                out.append(FramingError(value))
        self._state = _IDLE

    def _fail(self, out: list[Frame | FramingError], reason: str) -> None:
        if self._state == _OBJECT:  # a skipped message was already answered
            out.append(FramingError(reason))
        self._state = _IDLE

    def _overflow(self, out: list[Frame | FramingError]) -> None:
        """The current object crossed the limit: answer now, keep scanning without storing."""
        out.append(FramingError(f"message larger than {self.max_message} bytes"))
        self._state = _SKIP
        del self._buf[: self._pos]
        self._pos = self._start = 0

    def _compact(self) -> None:
        """Drop bytes no longer needed: everything before the current object (or all, when
        idle, in junk or skipping)."""
        keep_from = self._start if self._state == _OBJECT else self._pos
        if keep_from > 0:
            del self._buf[:keep_from]
            self._pos -= keep_from
            self._start = max(0, self._start - keep_from)
