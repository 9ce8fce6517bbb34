"""Routing policies on a real in-memory index."""

from __future__ import annotations

import pytest

from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex
from edgellm.kvindex.router import NoReadyPod, PodLoad, Router, RouterConfig

CTX = ("m", -1)
BS = 16
PROMPT = list(range(500, 500 + 8 * BS))


@pytest.fixture
def index():
    idx = MemoryPrefixIndex(IndexConfig(max_prefixes_per_context=10**5))
    idx.process_block_stored(CTX, "a", list(range(1, 9)), None, PROMPT, BS)   # all 8 blocks
    idx.process_block_stored(CTX, "b", [11, 12], None, PROMPT[: 2 * BS], BS)  # 2 blocks
    yield idx
    idx.close()


def loads(**running):
    return {pod: PodLoad(running=r) for pod, r in running.items()}


def test_longest_match_wins(index) -> None:
    d = Router(index).route(CTX, PROMPT, loads(a=3, b=1, c=0))
    assert (d.pod_key, d.reason, d.matched_blocks, d.prompt_blocks) == ("a", "prefix-match", 8, 8)


def test_imbalance_sends_to_least_loaded(index) -> None:
    d = Router(index).route(CTX, PROMPT, loads(a=20, b=5, c=3))
    assert (d.pod_key, d.reason) == ("c", "imbalance")
    assert "spread 17" in d.detail


def test_overloaded_pod_is_filtered_by_mean_plus_two_sigma(index) -> None:
    many = {f"p{i:02d}": PodLoad(running=1) for i in range(10)}
    many["a"] = PodLoad(running=9)  # mean 1.67, sigma 2.2: ceiling 6.1 < 9
    many["b"] = PodLoad(running=1)
    d = Router(index).route(CTX, PROMPT, many)
    assert (d.pod_key, d.reason, d.matched_blocks) == ("b", "prefix-match", 2)


def test_equal_match_goes_to_fewer_running_then_pod_key(index) -> None:
    index.process_block_stored(CTX, "c", list(range(21, 29)), None, PROMPT, BS)
    assert Router(index).route(CTX, PROMPT, loads(a=4, c=2)).pod_key == "c"
    assert Router(index).route(CTX, PROMPT, loads(a=2, c=2)).pod_key == "a"
    assert Router(index).route(CTX, PROMPT, {"c": PodLoad(2, 0), "a": PodLoad(2, 1)}).pod_key == "c"


def test_no_match_falls_back_to_least_loaded(index) -> None:
    d = Router(index).route(CTX, list(range(90_000, 90_000 + 64)), loads(a=3, b=2, c=2))
    assert (d.pod_key, d.reason, d.matched_blocks) == ("b", "least-loaded", 0)


def test_weighted_policy(index) -> None:
    router = Router(index, RouterConfig(policy="weighted"))
    d = router.route(CTX, PROMPT, {"a": PodLoad(waiting=4, kv_utilisation=0.9),
                                    "b": PodLoad(waiting=0, kv_utilisation=0.1)})
    # a: 2*1 + 1*0 + 1*0.1 = 2.1; b: 2*0.25 + 1*1 + 1*0.9 = 2.4
    assert (d.pod_key, d.reason) == ("b", "weighted")
    assert d.scores["a"] == pytest.approx(2.1) and d.scores["b"] == pytest.approx(2.4)
    heavy = Router(index, RouterConfig(policy="weighted", weights=(10, 1, 1)))
    assert heavy.route(CTX, PROMPT, {"a": PodLoad(waiting=4, kv_utilisation=0.9),
                                     "b": PodLoad(waiting=0, kv_utilisation=0.1)}).pod_key == "a"


def test_no_ready_pod(index) -> None:
    with pytest.raises(NoReadyPod):
        Router(index).route(CTX, PROMPT, {})


def test_config_validation_and_env() -> None:
    with pytest.raises(ValueError):
        RouterConfig(policy="magic")
    with pytest.raises(ValueError):
        RouterConfig(weights=(0, 0, 0))
    config = RouterConfig.from_env({
        "EDGELLM_ROUTER_POLICY": "weighted", "EDGELLM_ROUTER_WEIGHTS": "3:1:0",
        "AIBRIX_PREFIX_CACHE_POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT": "8",
        "AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR": "1.5"})
    assert config == RouterConfig("weighted", 8, 1.5, (3.0, 1.0, 0.0))
    with pytest.raises(ValueError):
        RouterConfig.from_env({"EDGELLM_ROUTER_WEIGHTS": "a:b"})


BS32 = 32
PROMPT32 = list(range(300, 300 + 8 * BS32))  # 8 blocks of 32 tokens


@pytest.fixture
def index32():
    """A context whose engines use 32-token blocks; ``a`` holds the whole prompt."""
    idx = MemoryPrefixIndex(IndexConfig(max_prefixes_per_context=10**5))
    idx.process_block_stored(CTX, "a", list(range(1, 9)), None, PROMPT32, BS32)
    yield idx
    idx.close()


def test_weighted_prefix_term_uses_the_contexts_block_size(index32) -> None:
    d = Router(index32, RouterConfig(policy="weighted")).route(
        CTX, PROMPT32, {"a": PodLoad(waiting=2, kv_utilisation=0.5), "b": PodLoad()})
    # a holds 100% of the prompt: 2*1 + 1*0 + 1*0.5 = 2.5 beats b's 0 + 1 + 1 = 2
    assert (d.pod_key, d.matched_blocks, d.prompt_blocks) == ("a", 8, 8)
    assert d.scores["a"] == pytest.approx(2.5) and d.scores["b"] == pytest.approx(2.0)


def test_prompt_blocks_in_the_contexts_block_size(index32) -> None:
    d = Router(index32).route(CTX, PROMPT32, loads(a=0, b=0))
    assert (d.pod_key, d.reason, d.matched_blocks, d.prompt_blocks) == ("a", "prefix-match", 8, 8)
    # nothing held: the router's own block size is all there is to count with
    d = Router(index32, block_size=BS32).route(CTX, list(range(9000, 9000 + 256)), loads(b=0))
    assert (d.reason, d.prompt_blocks) == ("least-loaded", 8)


@pytest.mark.parametrize("bad", [
    {"std_factor": float("nan")}, {"std_factor": -1.0}, {"std_factor": float("inf")},
    {"weights": (float("nan"), 1, 1)}, {"weights": (2, -1, 1)}, {"weights": (1, 1)},
    {"weights": (float("inf"), 1, 1)}, {"imbalance_threshold": -1},
    {"imbalance_threshold": 2.5}, {"imbalance_threshold": True},
])
def test_config_rejects_bad_numbers(bad) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        RouterConfig(**bad)


def test_env_nan_is_rejected() -> None:
    with pytest.raises(ValueError, match="std_factor"):
        RouterConfig.from_env({"AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR": "nan"})
    with pytest.raises(ValueError, match="weights"):
        RouterConfig.from_env({"EDGELLM_ROUTER_WEIGHTS": "nan:1:1"})


@pytest.mark.parametrize("bad", [{"running": -1}, {"waiting": -3}, {"running": 1.5},
                                 {"kv_utilisation": float("nan")}, {"kv_utilisation": 1.5},
                                 {"kv_utilisation": "0.5"}])
def test_pod_load_rejects_bad_numbers(bad) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        PodLoad(**bad)


def test_aibrix_load_counts_queued_requests(index) -> None:
    # a holds the whole prompt but has 20 requests queued: 22 in flight vs b's 3
    d = Router(index).route(CTX, PROMPT, {"a": PodLoad(running=2, waiting=20),
                                          "b": PodLoad(running=3)})
    assert (d.pod_key, d.reason) == ("b", "imbalance")
    assert "in-flight spread 19" in d.detail


def test_router_block_size_must_be_positive(index) -> None:
    with pytest.raises(ValueError, match="block_size"):
        Router(index, block_size=0)
