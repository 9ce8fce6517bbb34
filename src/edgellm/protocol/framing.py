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
- Otherwise the object's bytes are validated as they arrive
  (:class:`~edgellm.protocol.json_prefix.JsonPrefix`: the JSON grammar, strings with their
  escapes and UTF-8, numbers, literals), so ``{"a":"}"}{"b":1}`` is two messages whatever
  the newlines, and a message is answered at the first byte where what is held can no longer
  begin a valid object: ``{bad`` at ``b``, without waiting for a newline or another message.
- Anything outside an object (``[1,2]``, ``hello``, a stray ``}``) is an error at its first
  byte.

An incomplete but valid object waits for its bytes (objects may span lines: ``{"a":1`` and a
newline is the start of one). :attr:`JsonStreamFramer.pending` says one is waiting; the
caller, which has a clock, calls :meth:`JsonStreamFramer.expire` when none of its bytes came
for its idle limit, and answers the error it returns.

Recovery (one bad message never swallows the next ones): after an error the bytes up to the
end of the line, or up to the next ``{``, are dropped with it; then framing starts afresh.

- a raw newline inside a string cannot occur in valid JSON (it must be escaped), so it marks
  the message as truncated, and framing restarts after the newline;
- a ``{`` that cannot continue the current object (JSON allows one only where a value goes)
  marks the current message as truncated, and framing restarts at that ``{``, e.g.
  ``{"a":1`` followed by ``{"request_id":...}``; so does a line that is a whole request on
  its own (``{"a":`` then a newline and ``{"request_id":...}``);
- a message longer than ``max_message`` bytes is answered with one error as soon as the
  limit is crossed (whitespace counts); its remaining bytes are validated but not stored, up
  to its end.

Memory is flat: the framer keeps at most the current message (``<= max_message`` bytes)
plus the unread part of the last chunk fed to it.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import msgspec

from edgellm.protocol.json_prefix import DONE, INVALID, MORE, NESTED, JsonPrefix

__all__ = ["DEFAULT_MAX_MESSAGE", "Frame", "FramingError", "JsonStreamFramer", "decode_object"]

DEFAULT_MAX_MESSAGE = 1 << 20
"""Default per-message size limit: 1 MiB."""

TRUNCATED_BY_OBJECT = "truncated message (a new object starts inside it)"
NOT_AN_OBJECT = "not a JSON object"

_decoder = msgspec.json.Decoder()

_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_RESYNC = re.compile(rb"[\n{]")
_SPACE = b" \t\r\n"

# Scanner states.
_IDLE = 0  # between messages
_OBJECT = 1  # inside an object being kept
_SKIP = 2  # inside an object over the size limit: validated, not kept
_DROP = 3  # after an error: dropping bytes up to the end of the line or the next "{"


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
        self._start = 0  # first byte of the current object
        self._state = _IDLE
        self._json = JsonPrefix()
        self._line_probe: list | None = None  # [line start, next byte, its JsonPrefix]
        self._over = False  # the message waiting on a line's verdict outgrew the limit

    @property
    def buffered(self) -> int:
        """Bytes held right now (for memory checks)."""
        return len(self._buf)

    @property
    def pending(self) -> bool:
        """A message has begun and not ended: it waits for more bytes."""
        return self._state == _OBJECT or self._state == _SKIP

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | FramingError]:
        """Add ``data``; return the messages and errors it completed, in stream order."""
        out: list[Frame | FramingError] = []
        self._buf += data
        self._scan(out)
        self._compact()
        return out

    def expire(self) -> list[Frame | FramingError]:
        """Give up the message waiting for its bytes (its sender went quiet): an error for
        it (none if it was already answered as too large); framing starts afresh."""
        out: list[Frame | FramingError] = []
        if self._state == _OBJECT:
            out.append(FramingError("incomplete message: the rest of it never came"))
        if self.pending:
            self._state = _IDLE
            self._line_probe = None
            self._over = False
            self._pos = len(self._buf)
            self._compact()
        return out

    # -- scanning ---------------------------------------------------------------------------

    def _scan(self, out: list[Frame | FramingError]) -> None:
        buf = self._buf  # an overflow shortens it in place: its length is read again
        while self._pos < len(buf):
            state = self._state
            if state == _IDLE:
                m = _NON_SPACE.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    return
                pos = m.start()
                if buf[pos] != 0x7B:  # not "{": wrong from its first byte
                    out.append(FramingError(NOT_AN_OBJECT))
                    self._drop(pos + 1)
                    continue
                if self._fast_line(pos, out):
                    continue
                self._state = _OBJECT
                self._start = self._pos = pos
                self._json.begin()
            elif state == _DROP:
                m = _RESYNC.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    return
                self._state = _IDLE
                self._pos = m.start() + (1 if buf[m.start()] == 0x0A else 0)
            else:
                self._scan_object(out)
                if self.pending:
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
        """Validate the current object's bytes up to the end of the buffer or of the object;
        while it is kept, no further than one byte past the size limit."""
        buf = self._buf
        end = len(buf)
        kept = self._state == _OBJECT
        stop = min(end, self._start + self.max_message + 1) if kept else end
        status, pos = self._json.scan(buf, self._pos, stop)
        while status > INVALID:  # NESTED: a "{" first on its line
            verdict = self._new_request_line(pos)
            if verdict is None:  # its line is not all here yet: decide when it is
                self._pos = pos
                if kept and len(buf) - self._start > self.max_message + 1:
                    # Whatever the line decides, the message before it is no frame now (cut
                    # short, or too large): hold the line alone, answer when it is decided.
                    del buf[:pos]
                    self._pos = self._start = 0
                    self._over = True
                    if self._line_probe is not None:
                        self._line_probe[1] -= self._line_probe[0]
                        self._line_probe[0] = 0
                return
            if self._over and not verdict:  # the message goes on: it is the one too large
                self._over = False
                self._overflow(out)
                self._scan_object(out)
                return
            self._over = False
            if verdict:
                self._fail(out, TRUNCATED_BY_OBJECT)
                self._pos = pos  # framing restarts at that "{"
                return
            self._json.accept_nested()
            status, pos = self._json.scan(buf, pos, stop)
        if status == DONE:
            self._pos = pos
            self._state = _IDLE
            if kept:
                self._finish(out)
        elif status == INVALID:
            if buf[pos] == 0x7B:  # a new object: framing restarts at it
                self._fail(out, TRUNCATED_BY_OBJECT)
                self._pos = pos
            else:
                self._fail(out, self._json.problem)
                self._drop(pos + (0 if buf[pos] == 0x0A else 1))
        else:
            self._pos = pos
            if kept and stop - self._start > self.max_message:
                self._overflow(out)
                self._scan_object(out)  # the rest of it, validated without being kept

    def _new_request_line(self, p: int) -> bool | None:
        """Whether the ``{`` at ``p`` starts a line that is a whole request on its own.

        Inside an object a ``{`` after ``:`` ``,`` ``[`` is legal, so a message cut short
        right after one of those would swallow the next request. A client that ends its
        messages with newlines shows where one begins: a line that decodes by itself as an
        object with a ``request_id`` or ``action`` is taken as a new message, and the one
        before it as truncated.

        The answer waits (``None``) while the line is still arriving and can still be one
        object: so the same bytes frame the same however they are cut. Meanwhile a message
        that outgrows the size limit is no longer held (see :meth:`_scan_object`). The line is checked
        as it comes, once per byte (``_line_probe``), never read again from its start.
        """
        buf = self._buf
        nl = buf.find(b"\n", p)
        if nl < 0:
            if len(buf) - p > self.max_message:
                return False
            probe = self._line_probe
            if probe is None or probe[0] != p:
                scanner = JsonPrefix()
                probe = self._line_probe = [p, p, scanner]
            status, probe[1] = probe[2].scan(buf, probe[1], len(buf))
            if status == MORE:
                return None  # can still be a whole request: wait for the rest of its line
            self._line_probe = None
            if status == INVALID or status == NESTED:
                return False
            # DONE: the object ended before the line did: a request only if blanks follow
            rest = buf[probe[1]:]
            return None if not rest.strip(_SPACE) else False
        self._line_probe = None
        if nl - p > self.max_message:
            return False
        value = decode_object(bytes(buf[p:nl]).rstrip())
        return type(value) is dict and ("request_id" in value or "action" in value)

    def _finish(self, out: list[Frame | FramingError]) -> None:
        raw = bytes(self._buf[self._start : self._pos])
        if len(raw) > self.max_message:
            out.append(FramingError(f"message larger than {self.max_message} bytes"))
            return
        value = decode_object(raw)
        out.append(Frame(raw, value) if type(value) is dict else FramingError(value))

    def _fail(self, out: list[Frame | FramingError], reason: str) -> None:
        if self._state == _OBJECT:  # a skipped message was already answered
            out.append(FramingError(reason))
        self._state = _IDLE

    def _drop(self, pos: int) -> None:
        """Drop bytes from ``pos`` up to the end of the line or the next ``{`` (recovery)."""
        self._state = _DROP
        self._pos = pos

    def _overflow(self, out: list[Frame | FramingError]) -> None:
        """The current object crossed the limit: answer now, keep scanning without storing."""
        out.append(FramingError(f"message larger than {self.max_message} bytes"))
        self._state = _SKIP
        self._line_probe = None
        del self._buf[: self._pos]
        self._pos = self._start = 0

    def _compact(self) -> None:
        """Drop bytes no longer needed: everything before the current object (or all before
        the next byte to scan, when idle, dropping or skipping)."""
        keep_from = self._start if self._state == _OBJECT else self._pos
        if keep_from > 0:
            del self._buf[:keep_from]
            probe = self._line_probe
            if probe is not None:
                if probe[0] < keep_from:
                    self._line_probe = None
                else:
                    probe[0] -= keep_from
                    probe[1] -= keep_from
            self._pos -= keep_from
            self._start = max(0, self._start - keep_from)
