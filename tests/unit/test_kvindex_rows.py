"""The C row table of the in-memory index (edgellm.kvindex._rows) against a dict of tuples."""

from __future__ import annotations

import gc
import random

import pytest

import struct

from xxhash import xxh64_intdigest

from edgellm.kvindex._rows import RowTable, chain_hashes, pack_tokens


@pytest.mark.parametrize("seed", range(4))
def test_behaves_like_a_dict_of_rows(seed) -> None:
    rng = random.Random(seed)
    table, ref = RowTable(), {}
    for _ in range(30_000):
        op = rng.random()
        # Small engine hashes collide in the low bits, random ones do not: both kinds.
        engine = rng.randrange(0, 500) if rng.random() < 0.5 else rng.getrandbits(64)
        if op < 0.45:
            row = (rng.getrandbits(60), None if rng.random() < 0.3 else rng.getrandbits(64),
                   rng.getrandbits(63))
            if rng.random() < 0.5:
                table[engine] = row
            else:
                table.add(engine, *row)
            ref[engine] = row
        elif op < 0.75:
            assert table.pop(engine, None) == ref.pop(engine, None)
        elif op < 0.8 and engine in ref:
            table.bump(engine)
            key, parent, state = ref[engine]
            ref[engine] = (key, parent, state + 1)
        else:
            assert table.get(engine) == ref.get(engine)
            assert table.key_of(engine) == (ref[engine][0] if engine in ref else None)
            assert (engine in table) == (engine in ref)
        assert len(table) == len(ref)
    assert sorted(table.items()) == sorted(ref.items())
    assert sorted(table.keys()) == sorted(ref) == sorted(table)
    assert sorted(table.values()) == sorted(ref.values())
    for engine in list(ref):
        del table[engine]
    assert len(table) == 0 and not table and table.__sizeof__() < 4096  # it shrank


def test_add_chain_links_each_row_to_the_one_before() -> None:
    table = RowTable()
    table.add(7, 70, None, 5)
    assert table.add_chain([1, 2, 3], [10, 20, 30], 7, 99, 98) == 3
    assert [table[e] for e in (1, 2, 3)] == [(10, 7, 99), (20, 1, 99), (30, 2, 98)]
    assert table[7] == (70, None, 5)  # the parent's own row is the caller's business
    # It stops before an engine hash already held (or named twice), leaving it as it was.
    assert table.add_chain([4, 2, 5], [40, 50, 60], None, 1, 0) == 1
    assert table[2] == (20, 1, 99) and 5 not in table
    table.add_child(8, 80, 3, 11)
    assert table[8] == (80, 3, 11) and table[3] == (30, 2, 99)
    # A child leaves: one child less, recency max(own, the child's).
    table[9] = (90, None, 5 << 20 | 2)
    assert table.leave(9, 3) == 5 << 20 | 1 and table.leave(9, 8) == 8 << 20
    assert table[9] == (90, None, 8 << 20) and table.leave(12345, 1) is None


def test_bad_values_are_refused() -> None:
    table = RowTable()
    with pytest.raises(TypeError):
        table[1] = (1, 2)
    with pytest.raises(OverflowError):
        table.add(-1, 1, None, 1)
    with pytest.raises(OverflowError):
        table.add(1, 1 << 62, None, 1)  # keys are below 2**60 (the top bits are flags)
    with pytest.raises(KeyError):
        table.bump(5)
    with pytest.raises(KeyError):
        table.add_child(1, 1, 5, 1)
    assert table.get("x") is None and "x" not in table and table.isdisjoint(["x", -1, 1 << 70])
    assert len(table) == 0


def test_holds_no_python_objects() -> None:
    assert not gc.is_tracked(RowTable())



@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 7, 8, 16, 33, 64])
def test_chain_hashes_is_xxh64_of_the_parent_and_the_block(block_size) -> None:
    rng = random.Random(block_size)
    width = 4 * block_size
    for _ in range(200):  # inputs of 12 .. 8 + 256 bytes: every branch of XXH64 they reach
        n = rng.randrange(0, 5)
        data = pack_tokens([rng.getrandbits(32) for _ in range(n * block_size)])
        seed, parent = rng.getrandbits(64), rng.getrandbits(64)
        expected, h = [], parent
        for i in range(n):
            h = xxh64_intdigest(struct.pack("<Q", h) + data[i * width:(i + 1) * width], seed)
            expected.append(h)
        assert chain_hashes(data, block_size, seed, parent) == expected


def test_chain_hashes_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        chain_hashes(b"\0" * 6, 1, 0, 0)  # not whole blocks
    with pytest.raises(ValueError):
        chain_hashes(b"", 0, 0, 0)
    with pytest.raises(OverflowError):
        chain_hashes(b"", 1, -1, 0)
    with pytest.raises(TypeError):
        chain_hashes("text", 1, 0, 0)
