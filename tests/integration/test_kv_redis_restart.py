"""A shared index whose Redis restarts or comes back behind (a failover to a lagging
replica): the pipeline notices without being restarted, rebuilds the pods from replay, and
no pod over-claims once it has; metrics say what happened."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from edgellm.discovery.provider import StaticPodProvider
from edgellm.kvevents.config import ManagerConfig, SubscriberConfig
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.redis_audit import dump
from edgellm.kvindex.redis_index import RedisPrefixIndex
from kvfakes.rig import EngineRig
from waits import wait_until
from redis_server import RedisServer, find_redis_server

pytestmark = pytest.mark.redis


def _held(index: RedisPrefixIndex) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for pods in dump(index).values():
        for pod, rows in pods.items():
            out.setdefault(pod, set()).update(rows)
    return out


@pytest.fixture
def setup():
    if find_redis_server() is None:
        pytest.skip("redis-server binary not found (make test installs it)")
    with RedisServer() as server:
        index = RedisPrefixIndex(IndexConfig(block_size=4), url=server.url)
        audit = RedisPrefixIndex(IndexConfig(block_size=4), url=server.url)
        rigs = [EngineRig(f"ns/p{k}", seed=10 + k, block_size=4) for k in range(3)]
        provider = StaticPodProvider([r.pod() for r in rigs])
        registry = CollectorRegistry()
        config = ManagerConfig(enabled=True, subscriber=SubscriberConfig(replay_timeout=1.0))
        manager = KVEventManager(provider, index, config=config, registry=registry).start()
        try:
            yield server, manager, rigs, audit, registry
        finally:
            manager.stop()
            for rig in rigs:
                rig.stop()
            index.close()
            audit.close()


def _truth(rigs) -> dict[str, set[int]]:
    return {r.pod_key: {h for _, h in r.engine.truth()} for r in rigs if r.engine.truth()}


def _metric(registry, name, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("how", ["empty", "behind"])
def test_the_index_is_rebuilt_after_redis_restarts_or_falls_behind(setup, how) -> None:
    server, manager, rigs, audit, registry = setup
    for rig in rigs:
        rig.publish_random(20)
    wait_until(lambda: _held(audit) == _truth(rigs), 20, "the index equal to the truth")
    if how == "behind":
        server.snapshot()
        # After the snapshot: blocks stored and removed - the removals are what a lagging
        # replica would lose, and an index missing them over-claims.
        for rig in rigs:
            rig.publish_events([rig.engine.evict(3)])
            rig.publish_random(5)
        wait_until(lambda: _held(audit) == _truth(rigs), 20, "the index up to date")
    server.restart(keep_data=(how == "behind"))
    if how == "behind":
        stale = _held(audit)
        assert any(not stale.get(p, set()) <= held for p, held in _truth(rigs).items()), \
            "the snapshot should over-claim (the test would prove nothing)"
    # Only the first pod publishes again: the others are idle, and must be rebuilt anyway.
    rigs[0].publish_random(5)
    wait_until(lambda: _held(audit) == _truth(rigs), 30,
               "the index rebuilt to the engines' truth without restarting anything")
    for rig in rigs:
        assert _metric(registry, "kvcache_zmq_resyncs_total", pod_key=rig.pod_key,
                       reason="index_lost") + _metric(
            registry, "kvcache_zmq_resyncs_total", pod_key=rig.pod_key,
            reason="index_error") >= 1, rig.pod_key
        # Every batch is still in the publishers' buffers: nothing was left unrebuilt.
        assert _metric(registry, "kvcache_zmq_partial_view", pod_key=rig.pod_key) == 0
    assert manager.applier_alive
