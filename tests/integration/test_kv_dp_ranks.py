"""A pod of two data-parallel ranks: one client per rank port, each with its own sequence,
both feeding the pod; a rank's restart touches only that rank's entries."""

from __future__ import annotations

import errno
import json
import random

import pytest
from prometheus_client import CollectorRegistry

from kvfakes.reference_index import ReferenceIndex
from kvfakes.rig import EngineRig
from waits import wait_until

from edgellm.comm.errors import EndpointError
from edgellm.discovery.pod import Pod
from edgellm.discovery.provider import StaticPodProvider
from edgellm.kvevents.config import ManagerConfig
from edgellm.kvevents.http import ScoreServer
from edgellm.kvevents.manager import KVEventManager


def _two_ranks() -> list[EngineRig]:
    """Rank 0 on two ports tried at random below the kernel's ephemeral range (as pyzmq's
    ``bind_to_random_port`` does), rank 1 on base + 1 (vLLM's data parallelism); when one of
    those is taken, both go and it starts over. (Ports the kernel picks itself are odd and
    their successors are the ones outgoing connections take: on a busy suite, base + 1 was
    taken every time.)"""
    rng = random.Random()
    for _ in range(50):
        pub, router = rng.sample(range(20_000, 30_000, 2), 2)
        try:
            first = EngineRig("ns/dp", pub_port=pub, router_port=router, data_parallel_rank=0,
                              seed=0, bind_retry=0)  # fmt: skip
        except EndpointError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        try:
            second = EngineRig("ns/dp", pub_port=first.pub_port, router_port=first.router_port,
                               data_parallel_rank=1, seed=1, bind_retry=0)  # fmt: skip
        except EndpointError as exc:
            first.stop()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return [first, second]
    raise RuntimeError("no two consecutive free ports in 50 tries")


@pytest.fixture
def dp_pod():
    ranks = _two_ranks()
    pub, router = ranks[0].pub_port, ranks[0].router_port
    assert [r.pub_port for r in ranks] == [pub, pub + 1]
    index = ReferenceIndex()
    provider = StaticPodProvider()
    registry = CollectorRegistry()
    manager = KVEventManager(provider, index, config=ManagerConfig(enabled=True),
                             registry=registry).start()  # fmt: skip
    pod = Pod("ns/dp", "127.0.0.1", "m", pub_port=pub, router_port=router, dp_size=2)
    made = list(ranks)
    yield pod, ranks, index, provider, registry, manager, made
    manager.stop()
    for rig in made:
        rig.stop()


def test_each_rank_is_its_own_stream_feeding_one_pod(dp_pod):
    pod, ranks, index, provider, registry, manager, made = dp_pod
    ranks[0].publish_random(5)
    ranks[1].publish_random(8)
    provider.add(pod)
    assert manager.index_keys(["ns/dp"]) == ["ns/dp#dp0", "ns/dp#dp1"]

    def truth_held() -> bool:
        return all(index.pod_blocks(f"ns/dp#dp{r}") == rig.engine.truth()
                   for r, rig in enumerate(ranks))  # fmt: skip

    wait_until(lambda: truth_held() and manager.wait_quiescent(1), 20, "both ranks replayed")
    assert manager.applied_seq("ns/dp#dp0") == 4 and manager.applied_seq("ns/dp#dp1") == 7

    # /v1/score answers for the pod: its best rank
    chain = ranks[1].engine.store_chain(2)
    ranks[1].publish_events([chain])
    wait_until(lambda: truth_held(), 20, "rank 1's new chain")
    server = ScoreServer(manager, index, registry)
    try:
        body = json.dumps({"model": "m", "token_ids": chain.token_ids, "pods": ["ns/dp"]})
        status, answer = server.score(body.encode())
    finally:
        server.stop()
    assert status == 200 and answer["pods"] == {"ns/dp": {"matched_blocks": 2, "percent": 100.0}}

    # rank 1 restarts on its port: a new sequence, a new cache; rank 0 is left alone
    rank0_blocks = index.pod_blocks("ns/dp#dp0")
    ports = ranks[1].pub_port, ranks[1].router_port
    ranks[1].stop()
    made.remove(ranks[1])
    new = EngineRig("ns/dp", pub_port=ports[0] - 1, router_port=ports[1] - 1,
                    data_parallel_rank=1, seed=9)  # fmt: skip
    made.append(new)
    ranks[1] = new
    new.publish_random(3)
    wait_until(lambda: truth_held(), 20, "rank 1 follows its new engine")
    assert index.pod_blocks("ns/dp#dp0") == rank0_blocks
    assert registry.get_sample_value("kvcache_zmq_resyncs_total",
                                     {"pod_key": "ns/dp#dp1", "reason": "restart"}) == 1
    assert registry.get_sample_value("kvcache_zmq_resyncs_total",
                                     {"pod_key": "ns/dp#dp0", "reason": "restart"}) is None

    provider.remove("ns/dp")  # every rank's entries and series go
    wait_until(lambda: not index.pods_with_blocks(), 20, "entries removed")
    assert registry.get_sample_value("kvcache_zmq_connection_status",
                                     {"pod_key": "ns/dp#dp1"}) is None
