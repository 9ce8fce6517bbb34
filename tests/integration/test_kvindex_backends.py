"""Both backends against the reference model and each other, on a real redis-server."""

from __future__ import annotations

import itertools
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.kvindex.api import PrefixIndex, StoreResult
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex
from edgellm.kvindex.redis_index import RedisPrefixIndex
from kvindex_model import BS, CONTEXTS, DOCS, PODS, Clock, configs, ops, run_ops

pytestmark = pytest.mark.redis

BIG = IndexConfig(max_prefixes_per_context=10**6, max_blocks=10**6)
CTX = ("m", -1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def redis_index(server, config=BIG, **kw) -> RedisPrefixIndex:
    return RedisPrefixIndex(config, url=server.url, namespace=f"t:{uuid.uuid4().hex}", **kw)


def test_is_a_prefix_index(redis_server) -> None:
    with redis_index(redis_server) as index:
        assert isinstance(index, PrefixIndex)
        assert index.is_ready()
    assert not index.is_ready()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(ops, max_size=30), configs)
def test_both_backends_match_the_reference_model(redis_server, op_list, config) -> None:
    # Every generated sequence drives memory, Redis and the model together (same clock):
    # answers, counts and eviction choices must agree at every step.
    clock = Clock()
    with MemoryPrefixIndex(config, clock=clock) as mem, \
            redis_index(redis_server, config, clock=clock) as red:
        run_ops([mem, red], op_list, config, clock)


class Both:
    """Applies every call to both backends and asserts identical answers."""

    def __init__(self, a: PrefixIndex, b: PrefixIndex) -> None:
        self.a, self.b = a, b

    def __getattr__(self, name):
        def call(*args, **kwargs):
            ra = getattr(self.a, name)(*args, **kwargs)
            rb = getattr(self.b, name)(*args, **kwargs)
            if name == "stats":
                keys = ("blocks", "prefixes", "evicted_blocks", "unknown_parent")
                ra, rb = ({k: r[k] for k in keys} for r in (ra, rb))
            assert ra == rb, (name, args, ra, rb)
            return ra
        return call


eviction_ops = st.lists(st.tuples(
    st.sampled_from(PODS), st.sampled_from(CONTEXTS), st.integers(0, len(DOCS) - 1),
    st.integers(1, 8), st.booleans()), max_size=25)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(eviction_ops, st.integers(3, 12), st.integers(2, 10))
def test_same_answers_under_eviction(redis_server, steps, budget, per_context) -> None:
    config = IndexConfig(max_blocks=budget, max_prefixes_per_context=per_context)
    with MemoryPrefixIndex(config) as mem, redis_index(redis_server, config) as red:
        both = Both(mem, red)
        counter = itertools.count(1)
        for pod, ctx, doc, n, remove in steps:
            hashes = [next(counter) for _ in range(n)]
            both.process_block_stored(ctx, pod, hashes, None, DOCS[doc][: n * BS], BS)
            if remove:
                both.process_block_removed(None, pod, hashes[-1:])
            stats = both.stats()
            assert stats["blocks"] <= budget
            for c in CONTEXTS:
                for d in range(len(DOCS)):
                    both.match_prefix(c, DOCS[d], list(PODS))


def test_replicas_share_one_index(redis_server) -> None:
    ns = f"t:{uuid.uuid4().hex}"
    t = list(range(300, 300 + 3 * BS))
    with RedisPrefixIndex(BIG, url=redis_server.url, namespace=ns) as writer, \
            RedisPrefixIndex(BIG, url=redis_server.url, namespace=ns) as reader:
        assert writer.process_block_stored(CTX, "a", [1, 2, 3], None, t, BS) == StoreResult(3)
        assert reader.match_prefix(CTX, t)["a"].matched_blocks == 3
        # The same event applied by a second replica changes nothing.
        reader.process_block_stored(CTX, "a", [1, 2, 3], None, t, BS)
        assert writer.stats()["blocks"] == 3
        reader.process_block_removed(None, "a", [3])
        assert writer.match_prefix(CTX, t)["a"].matched_blocks == 2
        writer.remove_pod("a")
        assert reader.match_prefix(CTX, t) == {} and reader.stats()["blocks"] == 0


def test_idle_contexts_are_dropped(redis_server) -> None:
    clock = FakeClock()
    config = IndexConfig(eviction_interval_s=60, idle_eviction_s=1200)
    with redis_index(redis_server, config, clock=clock) as index:
        t = list(range(300, 300 + BS))
        index.process_block_stored(("old", -1), "a", [1], None, t, BS)
        clock.now += 1000
        index.process_block_stored(("new", -1), "a", [2], None, t, BS)
        clock.now += 300
        index.process_block_removed(None, "zzz", [1])
        stats = index.stats()
        assert stats["contexts"] == 1 and stats["blocks"] == 1
        assert index.match_prefix(("old", -1), t) == {}
        assert index.match_prefix(("new", -1), t)["a"].matched_blocks == 1


def test_block_size_mismatch_and_bad_tokens(redis_server) -> None:
    with redis_index(redis_server) as index:
        t = list(range(300, 364))
        index.process_block_stored(CTX, "a", [1, 2], None, t[:32], 16)
        assert index.process_block_stored(CTX, "b", [5], None, t[:32], 32).stored == 0
        assert index.process_block_stored(CTX, "b", [6], None, [-1] * 16, 16).stored == 0
        stats = index.stats()
        assert stats["block_size_mismatch"] == 1 and stats["invalid_tokens"] == 1
        assert index.match_prefix(CTX, t)["a"].matched_blocks == 2


def test_remove_pod_touches_only_its_own_entries(redis_server) -> None:
    # Proportional cost: removing a pod runs over its own map, so other pods' keys are
    # never read. Checked through Redis' per-command stats.
    with redis_index(redis_server) as index:
        client = index._redis
        for k in range(5):
            hashes = list(range(k * 1000, k * 1000 + 50))
            tokens = [7000 + k] + list(range(300, 300 + 50 * BS - 1))
            index.process_block_stored(CTX, f"pod-{k}", hashes, None, tokens, BS)
        index.process_block_stored(CTX, "small", [99], None, list(range(5, 5 + BS)), BS)
        client.config_resetstat()
        assert index.remove_pod("small") == 1
        calls = {k: v["calls"] for k, v in client.info("commandstats").items()}
        assert calls.get("cmdstat_hget", 0) <= 3, calls
        assert index.stats()["blocks"] == 250


def test_a_store_over_budget_is_one_round_trip(redis_server) -> None:
    # Eviction runs inside the store script: however many contexts and pods there are, a
    # store that pushes the index over its budget is one EVALSHA and nothing else.
    config = IndexConfig(max_blocks=200, max_prefixes_per_context=10**6)
    with redis_index(redis_server, config) as index:
        for c in range(10):
            for p in range(5):
                index.process_block_stored((f"m{c}", -1), f"pod-{p}", [c * 100 + p], None,
                                           [7000 + c, 300 + p, 1, 2], BS)
        index.process_block_stored(CTX, "a", list(range(1, 151)), None,
                                   list(range(300, 300 + 150 * BS)), BS)
        sent: list[str] = []
        client = index._redis
        execute = client.execute_command

        def counted(*args, **kwargs):  # what this client sends (commands run by scripts
            sent.append(str(args[0]))   # inside Redis are not round trips)
            return execute(*args, **kwargs)

        client.execute_command = counted
        try:
            index.process_block_stored(CTX, "a", [999], 150, list(range(9000, 9000 + BS)), BS)
        finally:
            client.execute_command = execute
        assert sent == ["EVALSHA"], sent
        assert index.stats()["blocks"] <= 200 and index.stats()["evicted_blocks"] > 0


def test_create_index_uses_redis_when_configured(redis_server) -> None:
    from edgellm.kvindex import create_index

    index = create_index(IndexConfig.from_env({"EDGELLM_KVINDEX_REDIS_URL": redis_server.url}))
    with index:
        assert isinstance(index, RedisPrefixIndex) and index.is_ready()


def test_remembered_chain_tail_removed_elsewhere(redis_server) -> None:
    # The writer remembers its chain tails to save a round trip; another replica's removal
    # (or clear) of that tail must still make the next block an unknown-parent event.
    ns = f"t:{uuid.uuid4().hex}"
    t = list(range(300, 300 + 4 * BS))
    with RedisPrefixIndex(BIG, url=redis_server.url, namespace=ns) as writer, \
            RedisPrefixIndex(BIG, url=redis_server.url, namespace=ns) as other:
        writer.process_block_stored(CTX, "a", [1, 2], None, t[: 2 * BS], BS)
        assert writer.process_block_stored(CTX, "a", [3], 2, t[2 * BS:3 * BS], BS).stored == 1
        assert other.process_block_removed(None, "a", [3]) == 1
        result = writer.process_block_stored(CTX, "a", [4], 3, t[3 * BS:], BS)
        assert result.unknown_parent and result.stored == 0
        other.clear_pod("a")
        # Same engine hashes, re-stored after the clear: the chain is rebuilt from its root.
        writer.process_block_stored(CTX, "a", [1, 2], None, t[: 2 * BS], BS)
        assert writer.process_block_stored(CTX, "a", [3], 2, t[2 * BS:3 * BS], BS).stored == 1
        assert other.match_prefix(CTX, t)["a"].matched_blocks == 3


def test_digest_engine_hashes_same_answers(redis_server) -> None:
    import hashlib

    digests = [int.from_bytes(hashlib.sha256(bytes([i])).digest(), "big") for i in range(4)]
    t = list(range(300, 300 + 4 * BS))
    with MemoryPrefixIndex(BIG) as mem, redis_index(redis_server) as red:
        both = Both(mem, red)
        both.process_block_stored(CTX, "a", digests[:3], None, t[: 3 * BS], BS)
        both.process_block_stored(CTX, "a", digests[3:], digests[2], t[3 * BS:], BS)
        both.process_block_removed(None, "a", [digests[1]])
        both.match_prefix(CTX, t, ["a"])
        both.stats()
