"""The Redis backend on a real three-master Redis Cluster, in both key placements.

``context`` placement keeps a context in one slot: within a context everything is as on
one Redis, so the reference model drives it (limits that span contexts - the block budget,
max contexts - are per context there, ``redis_keys.py``: the generated configs keep them
out of reach). ``pod`` placement spreads a context's pods over shards: answers must still
equal memory's; counts of distinct prefixes are per shard there (a prefix two shards hold
counts twice), so they are not compared.
"""

from __future__ import annotations

import itertools
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.kvindex.api import FENCED, STORED, IndexBatch
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex
from edgellm.kvindex.redis_index import RedisPrefixIndex
from kvindex_model import BS, CONTEXTS, DOCS, PODS, Clock, ops, run_ops
from redis_cluster import RedisCluster
from redis_server import find_redis_server

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def cluster():
    if find_redis_server() is None:
        pytest.skip("redis-server binary not found (make test installs it)")
    with RedisCluster() as made:
        yield made


def cluster_index(cluster, placement: str, config: IndexConfig | None = None, **kw):
    config = config or IndexConfig(max_blocks=10**6, max_prefixes_per_context=10**6)
    config = IndexConfig(**{**{f: getattr(config, f) for f in config.__slots__},
                            "redis_placement": placement, "redis_pod_groups": 4})
    return RedisPrefixIndex(config, url=cluster.url, namespace=f"t:{uuid.uuid4().hex}", **kw)


big_configs = st.builds(
    lambda idle: IndexConfig(max_blocks=10**6, max_prefixes_per_context=10**6,
                             max_contexts=1000, eviction_interval_s=5.0, idle_eviction_s=idle),
    st.sampled_from((20.0, 10**6)))


def test_is_a_cluster(cluster) -> None:
    with cluster_index(cluster, "context") as index:
        assert index.placement.cluster and index.stats()["placement"] == "context"


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(ops, max_size=30), big_configs)
def test_context_placement_matches_the_reference_model(cluster, op_list, config) -> None:
    clock = Clock()
    with MemoryPrefixIndex(config, clock=clock) as mem, \
            cluster_index(cluster, "context", config, clock=clock) as red:
        run_ops([mem, red], op_list, config, clock)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(PODS), st.sampled_from(CONTEXTS),
                          st.integers(0, len(DOCS) - 1), st.integers(1, 8), st.booleans()),
                max_size=20))
def test_pod_placement_answers_as_memory(cluster, steps) -> None:
    with MemoryPrefixIndex(IndexConfig()) as mem, cluster_index(cluster, "pod") as red:
        counter = itertools.count(1)
        for pod, ctx, doc, n, remove in steps:
            hashes = [next(counter) for _ in range(n)]
            for index in (mem, red):
                index.process_block_stored(ctx, pod, hashes, None, DOCS[doc][: n * BS], BS)
                if remove:
                    index.process_block_removed(None, pod, hashes[-1:])
            assert mem.stats()["blocks"] == red.stats()["blocks"]
            for c in CONTEXTS:
                for d in range(len(DOCS)):
                    for ready in (None, list(PODS[:2])):
                        want = {p: m.matched_blocks for p, m in
                                mem.match_prefix(c, DOCS[d], ready).items()}
                        got = {p: m.matched_blocks for p, m in
                               red.match_prefix(c, DOCS[d], ready).items()}
                        assert got == want, (c, d, ready)


@pytest.mark.parametrize("placement", ["context", "pod"])
def test_fencing_and_takeover_on_a_cluster(cluster, placement) -> None:
    ctx = ("m", -1)
    t = list(range(300, 316))
    with cluster_index(cluster, placement) as index:
        batch = IndexBatch(ctx, "p", [(STORED, [1, 2], None, t[:8], 4)], seq=4, epoch=1,
                           digest=9)
        assert index.apply_batches([batch])[0][0].stored == 2
        assert index.take_over(ctx, "p", 2).seq == 4
        stale = IndexBatch(ctx, "p", [(STORED, [3], 2, t[8:12], 4)], seq=5, epoch=1)
        assert index.apply_batches([stale]) == [FENCED]
        assert index.match_prefix(ctx, t)["p"].matched_blocks == 2
