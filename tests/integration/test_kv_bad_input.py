"""Bad input on a pod's live stream, through real sockets into the real memory index: it
is counted under a documented error type and harms nothing else."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from kvfakes.rig import EngineRig
from waits import wait_until

from edgellm.discovery.provider import StaticPodProvider
from edgellm.kvevents.config import ManagerConfig, SubscriberConfig
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex
from edgellm.protocol.kv_events import BlockStored, EventBatch, encode_batch

BLOCK = 16


@pytest.fixture
def pipeline():
    index = MemoryPrefixIndex(IndexConfig(block_size=BLOCK))
    provider = StaticPodProvider()
    registry = CollectorRegistry()
    config = ManagerConfig(enabled=True, subscriber=SubscriberConfig(idle_probe_interval=0))
    manager = KVEventManager(provider, index, config=config, registry=registry).start()
    rigs: list[EngineRig] = []

    def rig(pod_key: str) -> EngineRig:
        made = EngineRig(pod_key, block_size=BLOCK)
        rigs.append(made)
        provider.add(made.pod())
        return made

    yield index, registry, manager, rig
    manager.stop()
    for made in rigs:
        made.stop()


def _errors(registry, pod_key: str, error_type: str) -> float:
    return registry.get_sample_value("kvcache_zmq_errors_total",
                                     {"pod_key": pod_key, "error_type": error_type}) or 0.0


def test_one_absurd_block_stored_costs_only_itself(pipeline):
    """A decodable BlockStored with block_size 1,000,000 and 3 tokens used to fix the
    context's block size for every pod; now it is an invalid event of its own pod."""
    index, registry, manager, rig = pipeline
    a, b = rig("ns/a"), rig("ns/b")
    tokens_a, tokens_b = list(range(1000, 1016)), list(range(100, 132))
    poison = BlockStored([7], None, [1, 2, 3], 1_000_000, None, "GPU", None)
    fine = BlockStored([8], None, tokens_a, BLOCK, None, "GPU", None)
    seq_a = a.publisher.publish_payload(encode_batch(EventBatch(1.0, [poison, fine])))
    wait_until(lambda: manager.applied_seq("ns/a") == seq_a, 20, "the poisoned batch applied")
    seq_b = b.publisher.publish([BlockStored([11, 12], None, tokens_b, BLOCK, None, "GPU", None)])
    wait_until(lambda: manager.applied_seq("ns/b") == seq_b, 20, "the other pod's batch applied")
    assert index.match_prefix(("m", -1), tokens_b)["ns/b"].matched_blocks == 2
    assert index.match_prefix(("m", -1), tokens_a)["ns/a"].matched_blocks == 1  # same batch
    assert _errors(registry, "ns/a", "invalid_event") == 1
    assert _errors(registry, "ns/a", "decode") == 0
    assert _errors(registry, "ns/b", "invalid_event") == 0
