"""The index contract, case by case, on both backends (memory, and Redis on a real server).

Each case is one the audit of issue 4 found the backends getting wrong or getting
differently; the property test of ``test_kvindex_backends.py`` covers the combinations.
"""

from __future__ import annotations

import uuid

import pytest

from edgellm.kvindex.api import IndexInputError, StoreResult
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex
from edgellm.kvindex.redis_index import RedisPrefixIndex
from kvindex_model import Clock

BS = 4
CTX = ("m", -1)
BIG = IndexConfig(max_prefixes_per_context=10**6, max_blocks=10**6)


def tokens(n_blocks: int, base: int = 300) -> list[int]:
    return list(range(base, base + n_blocks * BS))


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make(request):
    """``make(config=BIG, clock=None)`` builds an index of the parametrised backend."""
    made = []

    def build(config: IndexConfig = BIG, clock=None):
        if request.param == "memory":
            index = MemoryPrefixIndex(config, **({"clock": clock} if clock else {}))
        else:
            server = request.getfixturevalue("redis_server")
            index = RedisPrefixIndex(config, url=server.url, namespace=f"t:{uuid.uuid4().hex}",
                                     **({"clock": clock} if clock else {}))
        made.append(index)
        return index

    yield build
    for index in made:
        index.close()


def matched(index, context, prompt, ready=None) -> dict[str, int]:
    return {p: m.matched_blocks for p, m in index.match_prefix(context, prompt, ready).items()}


# --- section 4 of the spec ----------------------------------------------------------------

def test_removal_on_one_pod_keeps_the_other_pods(make) -> None:
    index = make()
    t = tokens(3)
    index.process_block_stored(CTX, "a", [1, 2, 3], None, t, BS)
    index.process_block_stored(CTX, "b", [71, 72, 73], None, t, BS)
    assert index.process_block_removed(None, "a", [2]) == 1
    assert matched(index, CTX, t) == {"a": 1, "b": 3}


def test_clear_in_one_context_keeps_the_pods_other_contexts(make) -> None:
    index = make()
    t = tokens(2)
    index.process_block_stored(CTX, "a", [1, 2], None, t, BS)
    index.process_block_stored(("m", 3), "a", [11, 12], None, t, BS)
    assert index.clear_pod("a", CTX) == 2
    assert matched(index, CTX, t) == {}
    assert matched(index, ("m", 3), t) == {"a": 2}


def test_unknown_parent_is_not_hashed_as_a_root(make) -> None:
    index = make()
    t = tokens(2)
    index.process_block_stored(CTX, "a", [1], None, t[:BS], BS)
    result = index.process_block_stored(CTX, "a", [3], 2, t[BS:], BS)
    assert result == StoreResult(0, unknown_parent=True, skipped=1)
    assert matched(index, CTX, t[BS:]) == {} and matched(index, CTX, t) == {"a": 1}
    assert index.stats()["unknown_parent"] == 1


def test_unknown_parent_counts_before_a_missing_full_block(make) -> None:
    index = make()
    t = tokens(3)
    index.process_block_stored(CTX, "a", [1, 2], None, t[: 2 * BS], BS)
    index.process_block_removed(None, "a", [2])  # the chain's tail (which Redis remembers)
    result = index.process_block_stored(CTX, "a", [3], 2, t[2 * BS:2 * BS + 1], BS)
    assert result.unknown_parent and index.stats()["unknown_parent"] == 1


# --- E: one prefix under several engine hashes ----------------------------------------------

def test_a_prefix_stays_while_any_of_its_engine_hashes_does(make) -> None:
    index = make()
    t = tokens(2)
    index.process_block_stored(CTX, "a", [1, 2], None, t, BS)  # unsalted
    index.process_block_stored(CTX, "a", [11, 12], None, t, BS)  # cache_salt: same tokens
    assert index.stats()["blocks"] == 4 and index.stats()["prefixes"] == 2
    assert index.process_block_removed(CTX, "a", [1, 2]) == 2
    assert matched(index, CTX, t) == {"a": 2}
    assert index.process_block_removed(CTX, "a", [12]) == 1
    assert matched(index, CTX, t) == {"a": 1}
    index.process_block_removed(CTX, "a", [11])
    assert index.stats()["blocks"] == 0 and index.stats()["prefixes"] == 0


def test_one_event_naming_an_engine_hash_twice(make) -> None:
    index = make()
    t = tokens(3)
    index.process_block_stored(CTX, "a", [1, 2], None, t[: 2 * BS], BS)
    # [5, 6, 5]: 5 ends up naming the third block (the last word), 6 the second.
    assert index.process_block_stored(CTX, "a", [5, 6, 5], None, t, BS).stored == 3
    assert index.stats()["blocks"] == 4 and index.stats()["prefixes"] == 3
    assert index.process_block_removed(CTX, "a", [1, 2]) == 2
    assert matched(index, CTX, t) == {}  # 5's first block was re-pointed: block 1 is gone
    assert index.process_block_removed(CTX, "a", [5, 6]) == 2
    assert index.stats()["blocks"] == 0 and index.stats()["prefixes"] == 0


def test_a_chain_stored_again_under_new_hashes_keeps_both(make) -> None:
    index = make()
    t = tokens(4)
    index.process_block_stored(CTX, "a", [1, 2, 3, 4], None, t, BS)
    index.process_block_stored(("m", 5), "b", [1, 2], None, t[: 2 * BS], BS)
    assert index.process_block_stored(CTX, "a", [11, 12, 13], None, t[: 3 * BS], BS).stored == 3
    assert index.process_block_removed(CTX, "a", [11, 12, 13]) == 3
    assert matched(index, CTX, t) == {"a": 4}
    assert index.process_block_removed(CTX, "a", [2]) == 1
    assert matched(index, CTX, t) == {"a": 1}


# --- D, L: an event that is not indexed changes nothing -------------------------------------

def test_rejected_events_create_no_context(make) -> None:
    index = make(IndexConfig(max_contexts=1, max_prefixes_per_context=10**6, max_blocks=10**6))
    t = tokens(2)
    index.process_block_stored(("A", -1), "a", [1, 2], None, t, BS)
    assert index.process_block_stored(("B", -1), "a", [9], 777, t[:BS], BS).unknown_parent
    assert index.process_block_stored(("C", -1), "a", [9], None, [-1] * 8, 8).stored == 0
    assert index.process_block_stored(("D", -1), "a", [9], None, [1, 2, 3], BS).stored == 0
    assert index.stats()["contexts"] == 1
    assert matched(index, ("A", -1), t) == {"a": 2}  # max_contexts=1 kept the live one
    # No block size was locked by the rejected events either.
    index2 = make()
    index2.process_block_stored(("C", -1), "b", [5], 778, t[:8], 8)
    assert index2.process_block_stored(("C", -1), "b", [6], None, t[:BS], BS).stored == 1


def test_an_event_without_a_full_block_leaves_no_holdings(make) -> None:
    index = make()
    for i in range(50):
        index.process_block_stored(CTX, f"pod-{i}", [i], None, [1, 2, 3], BS)
    stats = index.stats()
    assert stats["pods"] == 0 and stats["blocks"] == 0 and stats["contexts"] == 0


# --- A: eviction --------------------------------------------------------------------------

def test_a_shared_system_prompt_survives_budget_eviction(make) -> None:
    index = make(IndexConfig(max_blocks=44, max_prefixes_per_context=10**6))
    system = tokens(4)
    convs = [tokens(4, 10_000 * (k + 1)) for k in range(11)]
    index.process_block_stored(CTX, "a", [1, 2, 3, 4], None, system, BS)
    for k in range(10):
        hashes = [100 * (k + 1) + j for j in range(4)]
        index.process_block_stored(CTX, "a", hashes, 4, convs[k], BS)
        for _ in range(3):
            index.match_prefix(CTX, system + convs[k])
    index.process_block_stored(CTX, "a", [2000, 2001, 2002, 2003], 4, convs[10], BS)
    assert index.stats()["blocks"] == 44 and index.stats()["evicted_blocks"] == 4
    assert [matched(index, CTX, system + c)["a"] for c in convs] == [4] + [8] * 10


def test_a_match_refreshes_the_blocks_it_matched(make) -> None:
    index = make(IndexConfig(max_prefixes_per_context=10**6, max_blocks=6))
    old, new = tokens(3), tokens(3, 5000)
    index.process_block_stored(CTX, "a", [1, 2, 3], None, old, BS)
    index.process_block_stored(CTX, "b", [4, 5, 6], None, new, BS)
    assert matched(index, CTX, old) == {"a": 3}  # "a", stored first, is used again
    index.process_block_stored(CTX, "c", [7], None, tokens(1, 9000), BS)
    assert matched(index, CTX, old) == {"a": 3}
    assert matched(index, CTX, new) == {"b": 2}  # b's tail was the least recently used leaf


def test_per_context_limit_evicts_that_contexts_lru_leaves(make) -> None:
    index = make(IndexConfig(max_blocks=10**6, max_prefixes_per_context=4))
    index.process_block_stored(CTX, "a", [1, 2, 3], None, tokens(3), BS)
    index.process_block_stored(("other", -1), "a", [1, 2, 3], None, tokens(3), BS)
    index.process_block_stored(CTX, "b", [7, 8], None, tokens(2, 5000), BS)
    assert index.stats()["prefixes"] == 7 and index.stats()["evicted_blocks"] == 1
    assert matched(index, CTX, tokens(3)) == {"a": 2}


# --- I: the idle clock and the max-contexts victim ------------------------------------------

@pytest.mark.parametrize("how", ["short prompt", "no ready pod", "unknown pod"])
def test_any_match_refreshes_the_idle_clock(make, how) -> None:
    clock = Clock()
    config = IndexConfig(eviction_interval_s=1, idle_eviction_s=10, max_blocks=10**6,
                         max_prefixes_per_context=10**6)
    index = make(config, clock)
    t = tokens(2)
    index.process_block_stored(("X", -1), "a", [1, 2], None, t, BS)
    clock.now += 8
    prompt, ready = {"short prompt": (t[: BS - 1], None), "no ready pod": (t, []),
                     "unknown pod": (t, ["zzz"])}[how]
    index.match_prefix(("X", -1), prompt, ready)
    clock.now += 5  # 13 s after the store, 5 s after the match
    index.process_block_stored(("Y", -1), "a", [3], None, t[:BS], BS)  # runs the sweep
    assert matched(index, ("X", -1), t) == {"a": 2}


def test_max_contexts_drops_the_same_context_on_a_tie(make) -> None:
    clock = Clock()
    index = make(IndexConfig(max_contexts=2, max_blocks=10**6,
                             max_prefixes_per_context=10**6), clock)
    t = tokens(1)
    names = [f"model-{i}" for i in range(3)]
    for i, name in enumerate(names):  # all at the same instant
        index.process_block_stored((name, -1), "a", [i], None, t, BS)
    kept = {name for name in names if matched(index, (name, -1), t)}
    # model-0 vs model-1 tie on access time; the smaller context id goes (validate.py).
    from edgellm.kvindex.validate import context_id

    gone = min(names[:2], key=lambda n: context_id((n, -1)))
    assert kept == set(names) - {gone}


# --- J, K: arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [
    [300, -1, 302, 303], [300, 1 << 32, 302, 303], [300, 300.5, 302, 303], None, "abcd",
    [300, None, 302, 303], [300, True, 302, 303]])
def test_a_bad_prompt_is_refused(make, prompt) -> None:
    index = make()
    index.process_block_stored(CTX, "a", list(range(1, 41)), None, tokens(40), BS)
    with pytest.raises(IndexInputError):
        index.match_prefix(CTX, prompt if prompt is None or isinstance(prompt, str)
                           else tokens(20) + prompt)


@pytest.mark.parametrize("context", [("m", "3"), ("m", None), "m", ("m", 1.0), ("m",),
                                     (None, -1)])
def test_a_bad_context_is_refused(make, context) -> None:
    index = make()
    with pytest.raises(IndexInputError):
        index.process_block_stored(context, "a", [1], None, tokens(1), BS)
    with pytest.raises(IndexInputError):
        index.match_prefix(context, tokens(1))
    assert index.stats()["contexts"] == 0


@pytest.mark.parametrize("args", [
    ("a", [1], None, tokens(1), 4.0), ("a", [1], None, tokens(1), "4"),
    ("a", [1], None, tokens(1), 0), ("a", [1], None, None, BS), ("a", [1], None, "abcd", BS),
    ("a", None, None, tokens(1), BS), ("a", ["x"], None, tokens(1), BS),
    ("a", [-5], None, tokens(1), BS), ("a", [1], -1, tokens(1), BS), (5, [1], None, tokens(1), BS)])
def test_a_bad_event_is_refused(make, args) -> None:
    index = make()
    with pytest.raises(IndexInputError):
        index.process_block_stored(CTX, *args)
    assert index.stats()["contexts"] == 0


def test_out_of_range_tokens_in_an_event_are_counted(make) -> None:
    index = make()
    assert index.process_block_stored(CTX, "a", [1], None, [-1, 2, 3, 4], BS).stored == 0
    assert index.process_block_stored(CTX, "a", [1], None, [1 << 32, 2, 3, 4], BS).stored == 0
    assert index.process_block_stored(CTX, "a", [1], None, [False, 2, 3, 4], BS).stored == 0
    assert index.process_block_stored(CTX, "a", [1, 2], None, [5] * 6 + [True, 1], BS).stored == 0
    assert index.stats()["invalid_tokens"] == 4 and index.stats()["contexts"] == 0


def test_the_configured_block_size_is_the_default(make) -> None:
    index = make(IndexConfig(block_size=8, max_blocks=10**6, max_prefixes_per_context=10**6))
    t = list(range(300, 316))
    assert index.process_block_stored(CTX, "a", [1, 2], None, t, None).stored == 2
    assert matched(index, CTX, t) == {"a": 2}
