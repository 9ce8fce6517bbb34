"""The incremental JSON-prefix validator against a byte-at-a-time reference automaton written
separately here, and against msgspec on complete objects."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellm.protocol.json_prefix import DONE, INVALID, MAX_DEPTH, MORE, NESTED, JsonPrefix

# -- the reference: one byte at a time, as the grammar reads ----------------------------------

HEX = set(b"0123456789abcdefABCDEF")


def reference(data: bytes) -> tuple[str, int]:
    """``("done", end)``, ``("invalid", first bad byte)`` or ``("more", len(data))``."""
    stack: list[int] = []
    expect = "top"  # top value value_or_close key key_or_close colon comma_or_close
    mode = ""  # "" | string | number | literal
    key = False
    esc = ""  # escape read so far ("\\", "\\u12", "\\ud800\\u...")
    utf8 = None
    number = ""
    literal = b""
    pos = 0
    while pos < len(data):
        c = data[pos]
        if mode == "string":
            if esc:
                esc += chr(c)
                n = len(esc)
                if n == 2:
                    if esc[1] in '"\\/bfnrt':
                        esc = ""
                    elif esc[1] != "u":
                        return "invalid", pos
                elif n <= 6:  # the four hex digits
                    if c not in HEX or n == 4 and esc[2] in "dD" and esc[3] in "cdefCDEF":
                        return "invalid", pos  # not hex, or a lone low surrogate
                    if n == 6 and not (esc[2] in "dD" and esc[3] in "89abAB"):
                        esc = ""
                elif n <= 12:  # a high surrogate's low one: \\ u d [c-f] hex hex
                    wanted = {7: b"\\", 8: b"u", 9: b"dD", 10: b"cdefCDEF"}.get(n, bytes(HEX))
                    if c not in wanted:
                        return "invalid", pos
                    if n == 12:
                        esc = ""
            elif utf8:  # inside a UTF-8 sequence: (bytes left, lowest, highest next byte)
                left, low, high = utf8
                if not low <= c <= high:
                    return "invalid", pos
                utf8 = (left - 1, 0x80, 0xBF) if left > 1 else None
            elif c == 0x22:
                mode = ""
                expect = "colon" if key else "comma_or_close"
            elif c == 0x5C:
                esc = "\\"
            elif c < 0x20:
                return "invalid", pos
            elif c >= 0x80:
                utf8 = UTF8_LEADS.get(c)
                if utf8 is None:
                    return "invalid", pos
            pos += 1
            continue
        if mode == "number":
            step = NUMBER_STEPS.get(number, {}).get(chr(c))
            if step is not None:
                number = step
                pos += 1
                continue
            if number not in ("zero", "int", "frac", "exp"):
                return "invalid", pos
            mode = ""
            expect = "comma_or_close"
            continue  # the same byte, as what follows the number
        if mode == "literal":
            if c != literal[0]:
                return "invalid", pos
            literal = literal[1:]
            pos += 1
            if not literal:
                mode = ""
                expect = "comma_or_close"
            continue
        if c in b" \t\r\n":
            pos += 1
            continue
        values = ("value", "value_or_close")
        if expect == "top":
            if c != 0x7B:
                return "invalid", pos
            stack.append(c)
            expect = "key_or_close"
        elif c == 0x7D and (expect == "key_or_close" or expect == "comma_or_close" and stack[-1] == 0x7B):
            stack.pop()
            if not stack:
                return "done", pos + 1
            expect = "comma_or_close"
        elif c == 0x5D and (expect == "value_or_close" or expect == "comma_or_close" and stack[-1] == 0x5B):
            stack.pop()
            expect = "comma_or_close"
        elif c == 0x2C and expect == "comma_or_close":
            expect = "key" if stack[-1] == 0x7B else "value"
        elif c == 0x3A and expect == "colon":
            expect = "value"
        elif c == 0x22 and expect in ("key", "key_or_close", *values):
            mode, key = "string", expect.startswith("key")
        elif c in (0x7B, 0x5B) and expect in values:
            if len(stack) >= MAX_DEPTH:
                return "invalid", pos
            stack.append(c)
            expect = "key_or_close" if c == 0x7B else "value_or_close"
        elif c in b"-0123456789" and expect in values:
            mode, number = "number", NUMBER_STEPS["start"][chr(c)]
        elif c in b"tfn" and expect in values:
            mode, literal = "literal", {0x74: b"rue", 0x66: b"alse", 0x6E: b"ull"}[c]
        else:
            return "invalid", pos
        pos += 1
    return "more", pos


# Well-formed UTF-8 (Unicode table 3-7): lead byte -> (bytes to follow, range of the next).
UTF8_LEADS = {
    **{lead: (1, 0x80, 0xBF) for lead in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF),
    **{lead: (2, 0x80, 0xBF) for lead in (*range(0xE1, 0xED), 0xEE, 0xEF)},
    0xED: (2, 0x80, 0x9F),
    0xF0: (3, 0x90, 0xBF),
    **{lead: (3, 0x80, 0xBF) for lead in range(0xF1, 0xF4)},
    0xF4: (3, 0x80, 0x8F),
}


def _steps(**moves: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for chars, state in moves.items():
        for ch in {"digit": "0123456789", "nonzero": "123456789", "zero": "0", "minus": "-",
                   "dot": ".", "e": "eE", "sign": "+-"}[chars]:
            table[ch] = state
    return table


# The number grammar, one character at a time; complete in zero, int, frac, exp.
NUMBER_STEPS = {
    "start": _steps(minus="minus", zero="zero", nonzero="int"),
    "minus": _steps(zero="zero", nonzero="int"),
    "zero": _steps(dot="dot", e="e"),
    "int": _steps(digit="int", dot="dot", e="e"),
    "dot": _steps(digit="frac"),
    "frac": _steps(digit="frac", e="e"),
    "e": _steps(sign="esign", digit="exp"),
    "esign": _steps(digit="exp"),
    "exp": _steps(digit="exp"),
}


# -- the validator fed in chunks --------------------------------------------------------------


def validate(data: bytes, cuts: list[int] = ()) -> tuple[str, int]:
    """Feed ``data`` cut at ``cuts``, as the framer does (the bytes from a MORE position on
    are kept and fed again); nested ``{`` always accepted."""
    v = JsonPrefix()
    pos = 0
    bounds = sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]
    for end in bounds:
        while True:
            status, at = v.scan(data, pos, end)
            if status == NESTED:
                v.accept_nested()
                pos = at
                continue
            break
        if status == DONE:
            return "done", at
        if status == INVALID:
            return "invalid", at
        assert status == MORE and at <= end
        pos = at
    return "more", len(data)


CASES = [
    (b"{bad", ("invalid", 1)),
    (b'{"a":1', ("more", 6)),
    (b'{"a":1\n  ', ("more", 9)),
    (b'{"a":1}', ("done", 7)),
    (b'{"a":1}xyz', ("done", 7)),
    (b'{"a":1,}', ("invalid", 7)),
    (b'{"a" 1}', ("invalid", 5)),
    (b'{"n":NaN}', ("invalid", 5)),
    (b'{"a":"\xff"}', ("invalid", 6)),
    (b'{"a":"x\ny"}', ("invalid", 7)),
    (b'{"a":trux}', ("invalid", 8)),
    (b'{"a":01}', ("invalid", 6)),
    (b'{"a":1.}', ("invalid", 7)),
    (b'{"a":1.5e+3}', ("done", 12)),
    (b'{"a":-', ("more", 6)),
    (b'{"a":"\\ud800', ("more", 12)),
    (b'{"a":"\\ud800x', ("invalid", 12)),
    (b'{"a":"\\udc00"}', ("invalid", 9)),
    (b'{"a":"\\ud800\\ud800"}', ("invalid", 15)),
    (b'{"a":"\\ud83d\\ude00"}', ("done", 20)),
    (b'{"a":"\\q"}', ("invalid", 7)),
    (b'{"a":"\xe4', ("more", 7)),
    (b'{"a":"\xe4\x41"}', ("invalid", 7)),
    (b'{"a":"\xed\xa0\x80"}', ("invalid", 7)),
    (b'{"a":"\xc0\x80"}', ("invalid", 6)),
    (b'{"a":[1,{"b":[]},{}],"c":{},"d":[true,false,null]}', ("done", 50)),
    (b'{"a":[1}', ("invalid", 7)),
    (b'{"a":"\x1f"}', ("invalid", 6)),
    (b'{"a":"\x7f"}', ("done", 9)),
    (b"[1]", ("invalid", 0)),
    (b'{"a":1}{', ("done", 7)),
]


@pytest.mark.parametrize("data,expected", CASES)
def test_the_first_bad_byte_and_the_end(data, expected):
    assert reference(data) == expected
    assert validate(data) == expected
    assert validate(data, list(range(len(data)))) == expected  # one byte at a time


def test_nesting_past_the_limit_is_refused_at_the_byte_that_goes_past():
    data = b'{"a":' + b"[" * (MAX_DEPTH + 5)
    assert validate(data) == ("invalid", 5 + MAX_DEPTH - 1)


def test_a_brace_first_on_its_line_is_the_callers_call():
    v = JsonPrefix()
    data = b'{"a":\n  {"b":1}}'
    assert v.scan(data, 0, len(data)) == (NESTED, 8)
    v.accept_nested()
    assert v.scan(data, 8, len(data)) == (DONE, len(data))
    v.begin()
    inline = b'{"a": {"b":1}}'
    assert v.scan(inline, 0, len(inline)) == (DONE, len(inline))


# -- generated: valid objects, their prefixes, and mutations ---------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)
objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)


@st.composite
def documents(draw) -> bytes:
    obj = draw(objects)
    indent = draw(st.sampled_from([None, 0, 1, 2]))
    ascii_only = draw(st.booleans())
    return json.dumps(obj, indent=indent, ensure_ascii=ascii_only).encode()


INTERESTING = b'{}[]:,"\\ \n\tu0123456789abcdefDEF.eE+-tfnrl\x00\x1f\x7f\xc2\xe0\xed\xf0\xf4\x80\xa0\xbf\xff'


@settings(max_examples=300, deadline=None)
@given(documents(), st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_every_prefix_of_a_valid_object_waits_and_the_whole_ends_it(doc, cuts):
    assert validate(doc, cuts) == ("done", len(doc))
    for n in range(len(doc)):
        assert validate(doc[:n]) == ("more", n), doc[:n]


@settings(max_examples=1500, deadline=None)
@given(
    documents(),
    st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.sampled_from(list(INTERESTING)),
                       st.sampled_from(["insert", "replace", "delete"])), min_size=1, max_size=3),
    st.lists(st.integers(min_value=0, max_value=400), max_size=4),
)
def test_mutated_objects_agree_with_the_reference_and_with_msgspec(doc, edits, cuts):
    data = bytearray(doc)
    for where, byte, how in edits:
        i = where % (len(data) + 1)
        if how == "insert":
            data[i:i] = bytes([byte])
        elif i < len(data):
            if how == "replace":
                data[i] = byte
            else:
                del data[i]
    data = bytes(data)
    expected = reference(data)
    assert validate(data, cuts) == expected, data
    if expected[0] == "done":
        whole = data[: expected[1]]
        try:
            decoded = msgspec.json.decode(whole)
        except (msgspec.DecodeError, ValueError) as exc:  # only a number too large for a float
            assert "out of range" in str(exc), (whole, exc)
        else:
            assert type(decoded) is dict
    elif expected[0] == "invalid":
        bad = data[: expected[1] + 1]
        for tail in (b"", b'"', b"}", b'"}', b"]}", b"0}", b'"0"}'):  # no end makes it an object
            try:
                decoded = msgspec.json.decode(bad + tail)
            except (msgspec.DecodeError, ValueError):  # ValueError: bad UTF-8
                continue
            assert type(decoded) is not dict, (bad + tail, decoded)
