"""The gateway's routing strategies on a real in-memory prefix index."""

from __future__ import annotations

from collections import Counter

import pytest

from edgellm.gateway.backend import Backend, EngineLoad, ModelInfo
from edgellm.gateway.routing import Candidate, Picker, pod_load
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex
from edgellm.kvindex.router import PodLoad

BS = 16
PROMPT = list(range(500, 500 + 6 * BS))


class Named(Backend):
    """A backend that only has a name (the picker reads nothing else)."""

    kind = "test"

    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.models = {"m": ModelInfo("m")}

    async def refresh(self): ...
    async def generate(self, request): ...


@pytest.fixture
def index():
    idx = MemoryPrefixIndex(IndexConfig(block_size=BS))
    idx.process_block_stored(("m", -1), "pod-b", list(range(1, 5)), None, PROMPT[: 4 * BS], BS)
    yield idx
    idx.close()


def candidates(**in_flight: int) -> list[Candidate]:
    return [Candidate(Named(f"be-{k}"), f"pod-{k}", PodLoad(running=n)) for k, n in in_flight.items()]


def test_prefix_cache_picks_the_backend_holding_the_prefix(index):
    choice = Picker(index).pick("prefix-cache", "m", candidates(a=0, b=2, c=0), PROMPT)
    assert (choice.backend.key, choice.reason, choice.matched_blocks, choice.prompt_blocks) == (
        "be-b", "prefix-match", 4, 6)  # fmt: skip


def test_prefix_cache_without_ids_or_index_falls_back_to_least_request(index):
    assert Picker(index).pick("prefix-cache", "m", candidates(a=3, b=2, c=5), None).reason == "no-prompt-tokens"
    choice = Picker(None).pick("prefix-cache", "m", candidates(a=3, b=2, c=5), PROMPT)
    assert (choice.backend.key, choice.reason) == ("be-b", "no-index")


def test_prefix_cache_yields_to_load_imbalance(index):
    choice = Picker(index).pick("prefix-cache", "m", candidates(a=0, b=20, c=1), PROMPT)
    assert (choice.backend.key, choice.reason) == ("be-a", "imbalance")


def test_least_request_round_robin_random(index):
    picker = Picker(index, seed=1)
    assert picker.pick("least-request", "m", candidates(a=2, b=1, c=1), PROMPT).backend.key == "be-b"
    turns = [picker.pick("round-robin", "m", candidates(a=0, b=0, c=0), PROMPT).backend.key
             for _ in range(6)]  # fmt: skip
    assert turns == ["be-a", "be-b", "be-c"] * 2
    drawn = Counter(picker.pick("random", "m", candidates(a=0, b=0, c=0), PROMPT).backend.key
                    for _ in range(300))  # fmt: skip
    assert set(drawn) == {"be-a", "be-b", "be-c"} and min(drawn.values()) > 50


def test_a_bad_prompt_for_the_index_is_routed_by_load(index):
    choice = Picker(index).pick("prefix-cache", "m", candidates(a=1, b=0), [-1, 2**40])
    assert (choice.backend.key, choice.reason) == ("be-b", "unindexable-prompt")


def test_load_is_the_larger_of_ours_and_the_engines():
    assert pod_load(3, None) == PodLoad(running=3)
    assert pod_load(1, EngineLoad(running=2, waiting=4, kv_cache_usage=0.5)) == PodLoad(2, 4, 0.5)
    assert pod_load(9, EngineLoad(running=2, waiting=4)) == PodLoad(5, 4, 0.0)  # stale report


def test_salted_requests_ignore_the_index_but_keep_to_their_salts_backend(index):
    picker = Picker(index)
    # pod-b holds the prompt; a salted request must not be drawn there by it
    picks = {picker.pick("prefix-cache", "m", candidates(a=0, b=0, c=0), PROMPT, salt).backend.key
             for salt in (f"tenant-{i}" for i in range(30))}  # fmt: skip
    assert picks == {"be-a", "be-b", "be-c"}  # spread by salt, not gathered by the prefix
    for salt in ("t1", "t2"):
        first = picker.pick("prefix-cache", "m", candidates(a=0, b=0, c=0), PROMPT, salt)
        again = picker.pick("prefix-cache", "m", candidates(a=2, b=1, c=0), PROMPT, salt)
        assert first.reason == "cache-salt" and again.backend.key == first.backend.key
    assert picker.pick("prefix-cache", "m", candidates(a=20, b=0, c=0), PROMPT, "t1").reason == "imbalance"
    assert picker.pick("round-robin", "m", candidates(a=0, b=0), PROMPT, "t1").reason == "round-robin"
