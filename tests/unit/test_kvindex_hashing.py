"""The prefix hash chain, checked against the formula written out by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from xxhash import xxh64_intdigest

from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.hashing import DEFAULT_SEED, block_bytes, chain, prefix_hashes


def by_hand(tokens, block_size, seed, parent=None):
    out = []
    h = seed if parent is None else parent
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size:(i + 1) * block_size]
        data = h.to_bytes(8, "little") + b"".join(t.to_bytes(4, "big") for t in block)
        h = xxh64_intdigest(data, seed)
        out.append(h)
    return out


@given(st.lists(st.integers(0, 2**32 - 1), max_size=80), st.integers(1, 20),
       st.integers(0, 2**64 - 1), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_chain_is_the_formula(tokens, block_size, seed, parent) -> None:
    assert prefix_hashes(tokens, block_size, seed, parent) == by_hand(tokens, block_size, seed, parent)


def test_known_vector() -> None:
    # Pinned so that a change of the formula (which would split replicas) fails loudly.
    assert prefix_hashes(list(range(16)), 16) == by_hand(list(range(16)), 16, DEFAULT_SEED)
    assert len(prefix_hashes(list(range(31)), 16)) == 1


def test_chain_continues() -> None:
    t = list(range(1000, 1064))
    full = prefix_hashes(t, 16)
    assert prefix_hashes(t[32:], 16, parent=full[1]) == full[2:]
    assert chain(block_bytes(t, 16, 4), 16) == full


@pytest.mark.parametrize("bad", [[-1] * 16, [2**32] * 16])
def test_token_out_of_range(bad) -> None:
    with pytest.raises(ValueError):
        prefix_hashes(bad, 16)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        prefix_hashes([1], 0)
    with pytest.raises(ValueError):
        prefix_hashes([1], 1, seed=-1)
    with pytest.raises(ValueError):
        block_bytes([1, 2], 2, 2)


def test_config_from_env() -> None:
    env = {
        "AIBRIX_SYNC_MAX_CONTEXTS": "5",
        "AIBRIX_SYNC_MAX_PREFIXES_PER_CONTEXT": "77",
        "AIBRIX_SYNC_EVICTION_INTERVAL_SECONDS": "3",
        "AIBRIX_SYNC_EVICTION_DURATION_MINUTES": "2",
        "AIBRIX_PREFIX_CACHE_BLOCK_SIZE": "32",
        "EDGELLM_KVINDEX_MAX_BLOCKS": "1000",
        "EDGELLM_KVINDEX_HASH_SEED": "0x10",
    }
    config = IndexConfig.from_env(env)
    assert (config.max_contexts, config.max_prefixes_per_context, config.eviction_interval_s,
            config.idle_eviction_s, config.block_size, config.max_blocks, config.seed) == (
        5, 77, 3.0, 120.0, 32, 1000, 16)
    defaults = IndexConfig.from_env({})
    assert (defaults.max_contexts, defaults.max_prefixes_per_context, defaults.block_size,
            defaults.eviction_interval_s, defaults.idle_eviction_s) == (1000, 10**6, 16, 60.0, 1200.0)
    # The per-context limit is the budget unless set (config.py): it never binds first.
    assert defaults.max_prefixes_per_context == defaults.max_blocks
    assert IndexConfig(max_blocks=5000).max_prefixes_per_context == 5000
    with pytest.raises(ValueError, match="AIBRIX_SYNC_MAX_CONTEXTS"):
        IndexConfig.from_env({"AIBRIX_SYNC_MAX_CONTEXTS": "many"})
    with pytest.raises(ValueError):
        IndexConfig.from_env({"AIBRIX_PREFIX_CACHE_BLOCK_SIZE": "0"})
    for bad in ({"idle_eviction_s": float("nan")}, {"eviction_interval_s": float("inf")},
                {"seed": -1}, {"max_blocks": True}):
        with pytest.raises(ValueError):
            IndexConfig(**bad)


def test_low_watermark() -> None:
    from edgellm.kvindex.config import low_watermark

    assert [low_watermark(n) for n in (1, 63, 64, 640, 1_000_000)] == [1, 63, 63, 630, 984375]


def test_engine_keys() -> None:
    from edgellm.kvindex.hashing import engine_key, engine_keys

    small = [1, 2**64 - 1]
    assert engine_keys(small) is small  # 64-bit hashes are used as they are
    digest = (7 << 200) | 12345
    assert engine_keys([digest, digest + 1]) == [12345, 12346]
    assert engine_key(digest) == 12345 and engine_key(5) == 5
