"""Fuzz target of the index's C extension, ``edgellm.kvindex._rows`` (``bench/fuzz.py`` runs
it on an AddressSanitizer build; ``bench/_fuzz_asan.py`` makes that build).

Each input is a program: its bytes pick operations on one :class:`RowTable` and their
arguments (engine hashes from a small set, so that probes collide and deletions shift rows
back; sometimes any 64-bit value, an edge, or a value that is not a uint64 at all), run on
the table and on a model of it (a dict of ``(key, parent, state)`` rows following the
documented contract, including what a call that fails has already done). After each
operation both agree on the answer or the exception type, and at the end on every row.
``pack_tokens`` and ``chain_hashes`` are checked against ``struct`` and the ``xxhash``
package the same way. Under ASan, any out-of-bounds access or use after free in the C code
ends the run with its report.
"""

from __future__ import annotations

import struct

from xxhash import xxh64_intdigest

U64 = 1 << 64
KEY_LIMIT = 1 << 62
CHILD_BITS = 20
_EDGES = (U64 - 1, 1 << 63, KEY_LIMIT, KEY_LIMIT - 1, 1 << 32, 0)
_INVALID = (-1, U64, "x", 1.5, None, True, 1 << 100)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u64(self) -> int:
        chunk = self.data[self.pos : self.pos + 8].ljust(8, b"\0")
        self.pos += 8
        return int.from_bytes(chunk, "little")

    def value(self) -> object:
        b = self.byte()
        if b < 170:
            return b % 48
        if b < 220:
            return self.u64()
        if b < 240:
            return _EDGES[b % len(_EDGES)]
        return _INVALID[b % len(_INVALID)]

    def key(self) -> object:
        b = self.byte()
        return b % 40 if b < 200 else self.value()


def _u64(x: object) -> int:
    """The C side's to_u64: TypeError for a non-int, OverflowError outside 0..2**64-1."""
    if not isinstance(x, int):
        raise TypeError
    if not 0 <= x < U64:
        raise OverflowError
    return int(x)


def _is_u64(x: object) -> bool:
    return isinstance(x, int) and 0 <= x < U64


class Model:
    """The row table's contract on a dict (see the module docstring)."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[int, int | None, int]] = {}

    def _store(self, e: int, key: int, parent: object, state: int, replace: bool) -> None:
        if key >= KEY_LIMIT:
            raise OverflowError
        p = None if parent is None else _u64(parent)
        if replace or e not in self.rows:
            self.rows[e] = (key, p, state)

    def add(self, e, key, parent, state) -> None:
        e, key, state = _u64(e), _u64(key), _u64(state)
        self._store(e, key, parent, state, True)

    def setitem(self, e, row) -> None:
        e = _u64(e)
        if not isinstance(row, tuple) or len(row) != 3:
            raise TypeError
        key, state = _u64(row[0]), _u64(row[2])
        self._store(e, key, row[1], state, True)

    def pop(self, e, *default):
        if _is_u64(e) and e in self.rows:
            return self.rows.pop(e)
        if default:
            return default[0]
        raise KeyError(e)

    def get(self, e, default=None):
        return self.rows.get(e, default) if _is_u64(e) else default

    def add_chain(self, engines, keys, parent, state, last) -> int:
        if not isinstance(keys, list) or not isinstance(engines, (list, tuple)):
            raise TypeError
        if len(engines) < len(keys):
            raise ValueError
        state, last = _u64(state), _u64(last)
        added, prev = 0, parent
        for k in range(len(keys)):
            e, key = _u64(engines[k]), _u64(keys[k])
            held = e in self.rows
            self._store(e, key, prev, last if k == len(keys) - 1 else state, False)
            if held:
                break
            added += 1
            prev = engines[k]
        return added

    def add_child(self, e, key, p, state) -> None:
        e, key, p, state = _u64(e), _u64(key), _u64(p), _u64(state)
        if p not in self.rows:
            raise KeyError(p)
        pk, pp, ps = self.rows[p]
        self.rows[p] = (pk, pp, (ps + 1) % U64)
        self._store(e, key, p, state, True)

    def leave(self, p, eff):
        if not _is_u64(p) or p not in self.rows:
            return None
        eff = _u64(eff)
        key, parent, state = self.rows[p]
        own, children = state >> CHILD_BITS, state & ((1 << CHILD_BITS) - 1)
        children -= children > 0
        state = ((max(eff, own) << CHILD_BITS) | children) % U64
        self.rows[p] = (key, parent, state)
        return state

    def key_of(self, e):
        return self.rows[e][0] if _is_u64(e) and e in self.rows else None

    def bump(self, e) -> None:
        if not _is_u64(e) or e not in self.rows:
            raise KeyError(e)
        key, parent, state = self.rows[e]
        self.rows[e] = (key, parent, (state + 1) % U64)


def _pack(tokens, *n):
    if not isinstance(tokens, (list, tuple)):
        raise TypeError
    count = len(tokens)
    if n:
        if not isinstance(n[0], int):
            raise TypeError
        if n[0] >= 1 << 63 or n[0] < -(1 << 63):
            raise OverflowError
        count = n[0]
        if not 0 <= count <= len(tokens):
            raise ValueError
    for t in tokens[:count]:
        if type(t) is not int:
            raise TypeError
        if not 0 <= t < 1 << 32:
            raise OverflowError
    return struct.pack(f">{count}I", *tokens[:count])


def _chain(data, block_size, seed, parent):
    if not isinstance(data, (bytes, bytearray)) or not isinstance(block_size, int):
        raise TypeError
    if not -(1 << 63) <= block_size < 1 << 63:
        raise OverflowError
    if not 1 <= block_size <= 1 << 20:
        raise ValueError
    seed, h = _u64(seed), _u64(parent)
    width = 4 * block_size
    if len(data) % width:
        raise ValueError
    out = []
    for i in range(0, len(data), width):
        h = xxh64_intdigest(struct.pack("<Q", h) + bytes(data[i : i + width]), seed)
        out.append(h)
    return out


def _same(real, model, *args):
    """Run both; they must answer alike (equal values, or the same exception type)."""
    try:
        want = model(*args)
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        want_exc = type(exc)
    else:
        want_exc = None
    try:
        got = real(*args)
    except Exception as exc:  # noqa: BLE001
        assert want_exc is not None and isinstance(exc, want_exc), (real, args, exc, want_exc)
        return
    assert want_exc is None, (real, args, got, want_exc)
    assert got == want, (real, args, got, want)


class RowsTarget:
    name = "rows"
    max_len = 4096
    tokens = ()

    def load(self) -> None:
        from edgellm.kvindex import _rows

        self.rows = _rows

    def seeds(self) -> list[bytes]:
        return [bytes(range(256)), bytes([0, 1, 2, 3] * 64), bytes([i % 16 for i in range(600)]),
                b"\x06" * 200 + b"\x02" * 200]  # fmt: skip

    def __call__(self, data: bytes) -> None:
        rows, r = self.rows, _Reader(data)
        table, model = rows.RowTable(), Model()
        while r.pos < len(data):
            op = r.byte() % 17
            if op == 0:
                _same(table.add, model.add, r.value(), r.key(), self._parent(r), r.value())
            elif op == 1:
                row = (r.key(), self._parent(r), r.value()) if r.byte() < 240 else (1, 2)
                e = r.value()
                _same(table.__setitem__, model.setitem, e, row)
            elif op in (2, 3):
                e = r.value()
                if r.byte() & 1:
                    _same(table.pop, model.pop, e, "absent")
                elif op == 2:
                    _same(table.__delitem__, lambda x: (model.pop(x), None)[1], e)
                else:
                    _same(table.pop, model.pop, e)
            elif op == 4:
                e = r.value()
                _same(table.get, model.get, e)
                assert (e in table) == (_is_u64(e) and e in model.rows)
            elif op == 5:
                n = r.byte() % 9
                engines = [r.value() for _ in range(n + r.byte() % 2)]
                keys = [r.key() for _ in range(n)]
                if r.byte() & 1:
                    engines = tuple(engines)
                _same(table.add_chain, model.add_chain, engines, keys, self._parent(r), r.value(),
                      r.value())  # fmt: skip
            elif op == 6:
                _same(table.add_child, model.add_child, r.value(), r.key(), r.value(), r.value())
            elif op == 7:
                _same(table.leave, model.leave, r.value(), r.value())
            elif op == 8:
                _same(table.key_of, model.key_of, r.value())
            elif op == 9:
                _same(table.bump, model.bump, r.value())
            elif op == 10:
                probe = [r.value() for _ in range(r.byte() % 5)]
                want = not any(_is_u64(x) and x in model.rows for x in probe)
                assert table.isdisjoint(probe) == want
            elif op == 11:
                self._compare(table, model)
            elif op == 12 and r.byte() < 16:
                table.clear()
                model.rows.clear()
            elif op == 13:
                tokens = [r.value() if r.byte() < 250 else r.u64() >> 30 for _ in range(r.byte() % 12)]
                args = (tokens,) if r.byte() & 1 else (tokens, r.byte() % 14 - 1)
                _same(rows.pack_tokens, _pack, *args)
            elif op == 14:
                block = r.byte() % 9 - 1 if r.byte() < 250 else r.value()
                size = r.byte() % 80
                payload = bytes(r.data[r.pos : r.pos + size]).ljust(size, b"\0")
                r.pos += size
                _same(rows.chain_hashes, _chain, payload, block, r.value(), r.value())
            elif op == 15:
                assert len(table) == len(model.rows)
            else:
                assert table.__sizeof__() > 0
        self._compare(table, model)

    @staticmethod
    def _parent(r: _Reader) -> object:
        return None if r.byte() < 80 else r.value()

    @staticmethod
    def _compare(table, model: Model) -> None:
        assert len(table) == len(model.rows)
        assert sorted(table.items()) == sorted(model.rows.items())
        assert sorted(table.keys()) == sorted(model.rows) == sorted(table)
