"""Incremental validation of one JSON object's bytes (RFC 8259), fed as they arrive.

:class:`JsonPrefix` answers, for the bytes of one message seen so far, whether they can still
begin a valid JSON object, and if not, which byte is the first that cannot: the framer of the
TCP front door (:mod:`edgellm.protocol.framing`) answers ``{bad`` at ``b`` instead of
waiting for a newline or a closing brace. It is a real validator, not a brace counter:

- structure: objects, arrays, ``:`` and ``,`` where the grammar puts them, nesting up to
  :data:`MAX_DEPTH`;
- strings: no raw control character, escapes ``\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX``, a
  ``\\uXXXX`` high surrogate only when a low one follows, no lone low surrogate, well-formed
  UTF-8 (no overlong form, no encoded surrogate, nothing past U+10FFFF);
- numbers (``-0.5e+3``; no leading zero, no bare ``.`` or ``e``) and ``true``/``false``/``null``.

That is what :mod:`msgspec` (the decoder behind it) accepts, but for a number too large for a
float (``1e999``) and the recursion limit of the decoding thread; so a complete object is still
decoded, and that decode has the last word.

Bytes are scanned once: a token cut by the end of the input (a string, number, literal, half
an escape or a UTF-8 sequence) is resumed later, and only a number or literal is read again
from its start. Data in, data out: the caller keeps the bytes; :meth:`JsonPrefix.scan` takes a
buffer and a range and returns a status and a position.
"""

from __future__ import annotations

import re

__all__ = ["DONE", "INVALID", "MAX_DEPTH", "MORE", "NESTED", "JsonPrefix"]

MORE = 0
"""Every byte so far can begin a valid object; scan again from the position returned."""
DONE = 1
"""The object ended; the position is just past its closing brace."""
INVALID = 2
"""The position is the first byte no valid object can have there; :attr:`JsonPrefix.problem`
says why."""
NESTED = 3
"""A ``{`` opening a value is the first byte of its line (see :meth:`JsonPrefix.scan`)."""

MAX_DEPTH = 512
"""Deepest nesting of objects and arrays taken (a message deeper is refused at the byte that
goes past it)."""

# What comes next (the grammar's position between tokens).
_TOP = 0  # the object's opening brace
_VALUE = 1  # after ':' or after ',' in an array
_VALUE_OR_CLOSE = 2  # after '['
_KEY_OR_CLOSE = 3  # after '{'
_KEY = 4  # after ',' in an object
_COLON = 5  # after a key
_COMMA_OR_CLOSE = 6  # after a value inside a container

_EXPECTED = {
    _TOP: "'{'",
    _VALUE: "a value",
    _VALUE_OR_CLOSE: "a value or ']'",
    _KEY_OR_CLOSE: "a string key or '}'",
    _KEY: "a string key",
    _COLON: "':'",
    _COMMA_OR_CLOSE: "',' or a closing bracket",
}

_CLOSED = -1  # a string read to its closing quote

# A token cut by the end of the input.
_NO_TOKEN = 0
_STRING = 1  # resumed inside its body
_NUMBER = 2  # resumed from its shape (:func:`_number_shape`): never held whole
_LITERAL = 3  # read again from its start

_WHITESPACE = re.compile(rb"[ \t\r\n]+")
_HEX = rb"[0-9a-fA-F]"
# A string's body up to (not including) its closing quote: runs of plain ASCII, escapes
# (\uXXXX: not a surrogate, or a high one followed by a low one), well-formed UTF-8.
_BODY = (  # possessive (never backtracks): a failing match costs its length, no more
    rb"(?:[ !#-\[\]-\x7f]++"
    rb'|\\(?:["\\/bfnrt]|u(?:[0-9a-cA-CefEF]' + _HEX + rb"{3}|[dD][0-7]" + _HEX + rb"{2}"
    rb"|[dD][89abAB]" + _HEX + rb"{2}\\u[dD][c-fC-F]" + _HEX + rb"{2}))"
    rb"|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}"
    rb"|\xf4[\x80-\x8f][\x80-\xbf]{2})*+"
)
_STRING_BODY = re.compile(_BODY)
# The longest start of an escape or a UTF-8 sequence that can still become a valid one: where
# it stops short of the input's end is the first bad byte.
_STRING_PARTIAL = re.compile(
    rb"\\(?:u(?:[dD](?:[89abAB](?:" + _HEX + rb"(?:" + _HEX + rb"(?:\\(?:u(?:[dD](?:[c-fC-F]"
    + _HEX + rb"?)?)?)?)?)?)?|[0-7]" + _HEX + rb"{0,2})?|[0-9a-cA-CefEF]" + _HEX + rb"{0,2})?)?"
    rb"|[\xc2-\xdf]|\xe0[\xa0-\xbf]?|[\xe1-\xec\xee\xef][\x80-\xbf]?|\xed[\x80-\x9f]?"
    rb"|\xf0(?:[\x90-\xbf][\x80-\xbf]?)?|[\xf1-\xf3][\x80-\xbf]{0,2}|\xf4(?:[\x80-\x8f][\x80-\xbf]?)?"
)
_WHOLE_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_RUN = re.compile(rb"[0-9.eE+-]*")
_DIGITS = re.compile(rb"[0-9]+")
# The longest start of a number (exponent first: alternatives are tried in order).
_NUMBER_PREFIX = re.compile(rb"-?(?:(?:0|[1-9][0-9]*)(?:(?:\.[0-9]+)?[eE][+-]?[0-9]*|\.[0-9]*)?)?")
_LITERALS = {0x74: b"true", 0x66: b"false", 0x6E: b"null"}

# Runs of simple members (``"key": scalar,``) and array elements (``scalar,``; an empty ``[]``
# or ``{}`` counts as a scalar here), each ending in a
# comma, taken in one match: a long flat array or object costs one regex call, not a loop turn
# per token. What a run does not take (a container, the last member, a cut or bad token) the
# loop reads.
_WS = rb"[ \t\r\n]*+"
_SCALAR = (rb'(?>"' + _BODY + rb'"|-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?'
           rb"|true|false|null|\[" + _WS + rb"\]|\{" + _WS + rb"\})")
_ELEMENT_RUN = re.compile(rb"(?:" + _WS + _SCALAR + _WS + rb",)+")
_MEMBER_RUN = re.compile(rb'(?:' + _WS + rb'"' + _BODY + rb'"' + _WS + rb":" + _WS + _SCALAR
                         + _WS + rb",)+")

_SPACE = frozenset(b" \t\r\n")
_NUMBER_START = frozenset(b"-0123456789")
_OPEN_OBJECT, _OPEN_ARRAY = 0x7B, 0x5B


def _number_shape(prefix: bytes) -> bytes:
    """A cut number's shape: each run of digits kept as its first digit. What may follow a
    prefix depends only on which parts it has begun and whether its integer starts with 0,
    so the shape stands for the whole prefix in at most 7 bytes."""
    return _DIGITS.sub(lambda m: m.group()[:1], prefix)


class JsonPrefix:
    """The state of one object's validation; :meth:`begin` before each object.

    :attr:`problem` is set with :data:`INVALID`: a short reason for the client.
    """

    __slots__ = ("_stack", "_expect", "_token", "_key", "_fresh_line", "_nested_ok", "_number",
                 "problem")

    def __init__(self) -> None:
        self._stack = bytearray()  # '{' / '[' of the open containers
        self.begin()

    def begin(self) -> None:
        """Start a new object (its first byte, ``{``, is the next one scanned)."""
        self._stack.clear()
        self._expect = _TOP
        self._token = _NO_TOKEN
        self._number = b""  # the shape of a number cut at the end of the bytes so far
        self._key = False  # the string being read is a key
        self._fresh_line = False  # a newline came since the last token
        self._nested_ok = False
        self.problem = ""

    @property
    def depth(self) -> int:
        return len(self._stack)

    def accept_nested(self) -> None:
        """After :data:`NESTED`: the ``{`` is part of this object; scan again from it."""
        self._nested_ok = True

    def scan(self, buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
        """Validate ``buf[pos:end]``, continuing from the previous call; ``(status, position)``.

        :data:`MORE`: all valid so far; call again with more bytes from ``position`` (the
        start of a cut literal, else ``end``). :data:`DONE`: the object ends at
        ``position``. :data:`INVALID`: ``buf[position]`` is the first byte that cannot be
        there. :data:`NESTED`: ``buf[position]`` is a ``{`` opening a value as the first
        non-blank byte of a line, which may as well be a new message after a cut one; the
        caller decides: :meth:`accept_nested` and scan again from ``position``, or drop it.
        """
        stack = self._stack
        expect = self._expect
        token = self._token
        if token == _STRING:
            status, pos = self._string(buf, pos, end)
            if status != _CLOSED:
                return status, pos
            expect = _COLON if self._key else _COMMA_OR_CLOSE
        elif token == _NUMBER:
            self._token = _NO_TOKEN
            status, pos = self._resume_number(buf, pos, end)
            if status != _CLOSED:
                return status, pos
            expect = _COMMA_OR_CLOSE
            self._fresh_line = False
        elif token:  # a literal (5 bytes at most): read again from its start
            self._token = _NO_TOKEN
        while pos < end:
            c = buf[pos]
            if c in _SPACE:
                m = _WHITESPACE.match(buf, pos, end)
                stop = m.end()  # type: ignore[union-attr]
                if not self._fresh_line and buf.find(b"\n", pos, stop) >= 0:
                    self._fresh_line = True
                pos = stop
                continue
            if expect == _COMMA_OR_CLOSE:
                if c == 0x2C:  # ","
                    if stack[-1] == _OPEN_OBJECT:
                        expect = _KEY
                        run = _MEMBER_RUN.match(buf, pos + 1, end)
                    else:
                        expect = _VALUE
                        run = _ELEMENT_RUN.match(buf, pos + 1, end)
                    if run is not None:
                        pos = run.end() - 1  # its last comma, taken below
                elif c == 0x7D or c == 0x5D:  # "}" "]"
                    if stack[-1] != (_OPEN_OBJECT if c == 0x7D else _OPEN_ARRAY):
                        return self._invalid(pos, expect, "a mismatched closing bracket")
                    stack.pop()
                    if not stack:
                        self._expect = _TOP
                        return DONE, pos + 1
                else:
                    return self._invalid(pos, expect)
                self._fresh_line = False
                pos += 1
            elif c == 0x22:  # '"'
                if expect == _KEY or expect == _KEY_OR_CLOSE:
                    self._key = True
                elif expect == _VALUE or expect == _VALUE_OR_CLOSE:
                    self._key = False
                else:
                    return self._invalid(pos, expect)
                self._fresh_line = False
                self._expect = expect
                status, pos = self._string(buf, pos + 1, end)
                if status != _CLOSED:
                    return status, pos
                expect = _COLON if self._key else _COMMA_OR_CLOSE
            elif c == 0x3A:  # ":"
                if expect != _COLON:
                    return self._invalid(pos, expect)
                expect = _VALUE
                self._fresh_line = False
                pos += 1
            elif c == 0x7B or c == 0x5B:  # "{" "["
                if expect == _TOP:
                    if c != 0x7B:
                        return self._invalid(pos, expect)
                elif expect != _VALUE and expect != _VALUE_OR_CLOSE:
                    return self._invalid(pos, expect)
                elif c == 0x7B and self._fresh_line and not self._nested_ok:
                    self._expect = expect
                    return NESTED, pos
                if len(stack) >= MAX_DEPTH:
                    self.problem = f"nested deeper than {MAX_DEPTH} levels"
                    return INVALID, pos
                stack.append(c)
                self._nested_ok = self._fresh_line = False
                pos += 1
                if c == 0x7B:
                    expect = _KEY_OR_CLOSE
                    run = _MEMBER_RUN.match(buf, pos, end)
                    if run is not None:
                        expect, pos = _KEY, run.end()
                else:
                    expect = _VALUE_OR_CLOSE
                    run = _ELEMENT_RUN.match(buf, pos, end)
                    if run is not None:
                        expect, pos = _VALUE, run.end()
            elif c == 0x5D and expect == _VALUE_OR_CLOSE:  # "]" of an empty array
                stack.pop()
                expect = _COMMA_OR_CLOSE
                self._fresh_line = False
                pos += 1
            elif c == 0x7D and expect == _KEY_OR_CLOSE:  # "}" of an empty object
                stack.pop()
                if not stack:
                    self._expect = _TOP
                    return DONE, pos + 1
                expect = _COMMA_OR_CLOSE
                self._fresh_line = False
                pos += 1
            elif expect != _VALUE and expect != _VALUE_OR_CLOSE:
                return self._invalid(pos, expect)
            elif c in _NUMBER_START:
                stop = _NUMBER_PREFIX.match(buf, pos, end).end()  # type: ignore[union-attr]
                if stop == end:  # cut: held by its shape, however long it grows
                    self._expect, self._token = expect, _NUMBER
                    self._number = _number_shape(bytes(buf[pos:end]))
                    return MORE, end
                whole = _WHOLE_NUMBER.match(buf, pos, end)
                if whole is None or whole.end() != stop:
                    self.problem = "a malformed number"
                    return INVALID, stop
                expect = _COMMA_OR_CLOSE
                self._fresh_line = False
                pos = stop
            else:
                word = _LITERALS.get(c)
                if word is None:
                    return self._invalid(pos, expect)
                n = min(len(word), end - pos)
                for i in range(1, n):
                    if buf[pos + i] != word[i]:
                        self.problem = f"not {word.decode()}"
                        return INVALID, pos + i
                if n < len(word):
                    self._expect, self._token = expect, _LITERAL
                    return MORE, pos
                expect = _COMMA_OR_CLOSE
                self._fresh_line = False
                pos += n
        self._expect = expect
        return MORE, end

    def _resume_number(self, buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
        """Go on with a number cut at the end of the previous bytes: ``(_CLOSED, the byte
        after it)``, ``(MORE, end)`` while it goes on, or ``(INVALID, the first bad byte)``."""
        run = _NUMBER_RUN.match(buf, pos, end).end()  # type: ignore[union-attr]
        held = self._number
        joined = held + bytes(buf[pos:run])
        stop = _NUMBER_PREFIX.match(joined).end()  # type: ignore[union-attr]
        at = pos - len(held)  # joined[i] stands for buf[at + i] (the held part: a shape)
        if stop == len(joined) and run == end:
            self._token = _NUMBER
            self._number = _number_shape(joined)
            return MORE, end
        whole = _WHOLE_NUMBER.match(joined)
        if whole is None or whole.end() != stop:
            self.problem = "a malformed number"
            return INVALID, at + stop
        return _CLOSED, at + stop

    def _string(self, buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
        """Read a string's body from ``pos``: ``(_CLOSED, after its closing quote)``,
        ``(MORE, where to resume)`` or ``(INVALID, the first bad byte)``."""
        stop = _STRING_BODY.match(buf, pos, end).end()  # type: ignore[union-attr]
        if stop < end and buf[stop] == 0x22:
            self._token = _NO_TOKEN
            return _CLOSED, stop + 1
        self._token = _STRING
        if stop == end:
            return MORE, stop
        partial = _STRING_PARTIAL.match(buf, stop, end)
        tail = stop if partial is None else partial.end()
        if tail == end:
            return MORE, stop  # half an escape or a UTF-8 sequence: wait for the rest
        byte = buf[tail]
        if byte == 0x0A:
            self.problem = "truncated message (newline inside a string)"
        elif byte < 0x20:
            self.problem = "a control character inside a string"
        elif buf[stop] == 0x5C:
            self.problem = "an invalid escape inside a string"
        else:
            self.problem = "invalid UTF-8 inside a string"
        return INVALID, tail

    def _invalid(self, pos: int, expect: int, what: str = "") -> tuple[int, int]:
        self._expect = expect
        self.problem = what or f"expected {_EXPECTED[expect]}"
        return INVALID, pos
