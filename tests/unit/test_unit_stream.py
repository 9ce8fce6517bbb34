import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgellm.unit.stream import MAX_PIECES, StreamAssembler, StreamIndexError


def piece(index, delta, finish):
    return {"delta": delta, "index": index, "finish": finish}


def test_single_piece_finishes_at_once():
    assert StreamAssembler().feed(piece(0, "hello", True)) == "hello"


def test_pieces_join_in_index_order_whatever_the_arrival_order():
    asm = StreamAssembler()
    assert asm.feed(piece(1, "b", False)) is None
    assert asm.feed(piece(0, "a", False)) is None
    assert asm.feed(piece(2, "c", True)) == "abc"
    assert len(asm) == 0  # ready for the next stream
    assert asm.feed(piece(0, "next", True)) == "next"


def test_repeated_index_overwrites_like_upstream():
    asm = StreamAssembler()
    asm.feed(piece(0, "old", False))
    assert asm.feed(piece(0, "new", True)) == "new"


def test_missing_finish_counts_as_finished_like_upstream():
    assert StreamAssembler().feed({"delta": "x", "index": 0}) == "x"


@pytest.mark.parametrize(
    "data",
    [
        "not an object",
        ["list"],
        {"delta": "x", "finish": True},  # no index
        {"delta": "x", "index": "0", "finish": True},
        {"delta": "x", "index": -1, "finish": True},
        {"delta": "x", "index": 1.5, "finish": True},
        {"delta": "x", "index": True, "finish": True},
        {"delta": 5, "index": 0, "finish": True},
        {"delta": "x", "index": 0, "finish": "true"},
    ],
)
def test_unreadable_pieces_raise_and_reset(data):
    asm = StreamAssembler()
    asm.feed(piece(0, "kept?", False))
    with pytest.raises(StreamIndexError):
        asm.feed(data)
    assert len(asm) == 0


def test_gap_at_finish_raises_and_the_next_stream_works():
    asm = StreamAssembler()
    asm.feed(piece(0, "a", False))
    with pytest.raises(StreamIndexError, match="gap at index 1"):
        asm.feed(piece(2, "c", True))
    assert asm.feed(piece(0, "fresh", True)) == "fresh"


def test_huge_index_is_a_gap_not_a_memory_hog():
    asm = StreamAssembler()
    with pytest.raises(StreamIndexError):
        asm.feed(piece(10**12, "x", True))


def test_piece_count_is_bounded():
    asm = StreamAssembler()
    for i in range(MAX_PIECES):
        asm.feed(piece(i, "", False))
    with pytest.raises(StreamIndexError, match="too large"):
        asm.feed(piece(MAX_PIECES, "", False))


@given(st.lists(st.text(max_size=5), min_size=1, max_size=20), st.randoms())
def test_any_permutation_reassembles(deltas, rnd):
    order = list(range(len(deltas) - 1))
    rnd.shuffle(order)
    asm = StreamAssembler()
    for i in order:
        assert asm.feed(piece(i, deltas[i], False)) is None
    last = len(deltas) - 1
    assert asm.feed(piece(last, deltas[last], True)) == "".join(deltas)
