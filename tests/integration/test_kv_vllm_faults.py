"""Faults between vLLM's own publisher (unchanged, in process) and the subscriber that
used to start resync storms: a replay buffer shorter than a gap, seen by a subscriber
that was paused while the engine published; a well-formed live message with a seq
behind the stream and bytes the engine never sent. The pod must settle after at most
one rebuild, then follow live again, with the index equal to what the engine can still
replay."""

from __future__ import annotations

import time

import msgspec
import pytest
import zmq
from prometheus_client import CollectorRegistry

from interop import vllm_loader
from kvfakes.relay import DroppingRelay
from waits import wait_until

from edgellm.discovery.pod import Pod
from edgellm.discovery.provider import StaticPodProvider
from edgellm.kvevents.config import ManagerConfig, SubscriberConfig
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex

BLOCK = 16
POD = "ns/f"


def _tokens(i: int) -> list[int]:
    return [7000 + i] * BLOCK


class Rig:
    """vLLM's ZmqEventPublisher -> relay -> KVEventManager -> MemoryPrefixIndex."""

    def __init__(self, kv, buffer_steps: int):
        self.kv = kv
        self.pub = kv.ZmqEventPublisher(data_parallel_rank=0, endpoint="tcp://*:0",
                                        replay_endpoint="tcp://*:0", buffer_steps=buffer_steps)
        ports = [int(s.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
                 for s in (self.pub._pub, self.pub._replay)]  # fmt: skip
        self.relay = DroppingRelay(f"tcp://127.0.0.1:{ports[0]}").start()
        self.index = MemoryPrefixIndex(IndexConfig(block_size=BLOCK))
        self.registry = CollectorRegistry()
        pod = Pod(POD, "127.0.0.1", "m", pub_port=self.relay.port, router_port=ports[1])
        config = ManagerConfig(enabled=True, subscriber=SubscriberConfig(idle_probe_interval=0))
        self.manager = KVEventManager(StaticPodProvider([pod]), self.index, config=config,
                                      registry=self.registry)  # fmt: skip
        self.published = 0

    def start(self, published_before: int) -> None:
        """Publish, subscribe, and wait until the start replay and the probe that follows
        the SUB's connection are done: from then on live batches arrive live."""
        last = self.publish(published_before)
        self.manager.start()
        wait_until(lambda: self.metric("replay_requests_total") >= 2 and self.settled(last), 20,
                   "subscribed, replayed, probed")  # fmt: skip

    def publish(self, n: int) -> int:
        for _ in range(n):
            toks = _tokens(self.published)
            stored = self.kv.BlockStored(block_hashes=[self.published], parent_block_hash=None,
                                         token_ids=toks, block_size=BLOCK, lora_id=None,
                                         medium="GPU", lora_name=None)  # fmt: skip
            self.pub.publish(self.kv.KVEventBatch(ts=time.time(), events=[stored]))
            self.published += 1
        last = self.published - 1
        wait_until(lambda: self.pub._buffer and self.pub._buffer[-1][0] == last, 20,
                   f"vLLM published batch {last}")  # fmt: skip
        return last

    def held_batches(self) -> set[int]:
        return {i for i in range(self.published)
                if self.index.match_prefix(("m", -1), _tokens(i)).get(POD)}  # fmt: skip

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(f"kvcache_zmq_{name}",
                                              {"pod_key": POD, **labels}) or 0.0  # fmt: skip

    def settled(self, last: int) -> bool:
        return self.manager.applied_seq(POD) == last and self.manager.wait_quiescent(1)

    def close(self) -> None:
        self.manager.stop()
        self.relay.stop()
        self.pub.shutdown()


@pytest.fixture
def rig_factory(monkeypatch):
    monkeypatch.delenv("VLLM_HOST_IP", raising=False)  # vLLM binds tcp://*:0 on 127.0.0.1
    reason = vllm_loader.missing_reason()
    if reason:
        pytest.skip(reason)
    kv = vllm_loader.load()
    made: list[Rig] = []

    def make(**kw) -> Rig:
        rig = Rig(kv, **kw)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


def test_gap_longer_than_the_replay_buffer_after_a_pause_settles_after_one_rebuild(rig_factory):
    rig = rig_factory(buffer_steps=5)
    rig.start(published_before=10)  # a late start: 5..9 replayed, 0..4 gone
    assert rig.held_batches() == set(range(5, 10))
    assert (rig.metric("missed_events_total"), rig.metric("partial_view")) == (5, 1)
    rig.relay.drop = set(range(10, 22))  # lost on the network
    rig.relay.pause()  # the subscriber is paused while the engine publishes
    last = rig.publish(21)  # 10..30; vLLM's buffer keeps 26..30
    rig.relay.resume()  # 22..30 arrive at once
    wait_until(lambda: rig.settled(last), 20, "the pod rebuilt and settled")
    assert rig.held_batches() == set(range(26, 31))  # what vLLM could still replay
    last = rig.publish(1)
    wait_until(lambda: rig.settled(last), 20, "live again")
    assert rig.held_batches() == set(range(26, 32))
    assert rig.metric("resyncs_total", reason="range_lost") == 1
    assert rig.metric("resyncs_total", reason="restart") == 0
    assert rig.metric("missed_events_total") == 5 + 12  # + what the network lost
    assert rig.metric("errors_total", error_type="stale_batch") == 4  # 22..25: too old now
    assert rig.metric("partial_view") == 1
    assert rig.metric("replay_requests_total") == 2 + 1  # the gap's; no storm


def test_bogus_live_message_behind_the_stream_is_dropped_without_a_rebuild(rig_factory):
    rig = rig_factory(buffer_steps=10_000)
    rig.start(published_before=10)
    last = 9
    bogus = rig.kv.KVEventBatch(ts=time.time(), events=[rig.kv.BlockStored(
        block_hashes=[999], parent_block_hash=None, token_ids=[1] * BLOCK, block_size=BLOCK,
        lora_id=None, medium="GPU", lora_name=None)])  # fmt: skip
    rig.relay.inject([b"", (last - 3).to_bytes(8, "big"), msgspec.msgpack.encode(bogus)])
    last = rig.publish(3)
    wait_until(lambda: rig.settled(last), 20, "the 3 next batches applied")
    assert rig.held_batches() == set(range(13))
    assert not rig.index.match_prefix(("m", -1), [1] * BLOCK)
    assert rig.metric("errors_total", error_type="stale_batch") == 1
    assert rig.metric("resyncs_total", reason="restart") == 0
    assert rig.metric("replay_requests_total") == 2 + 1  # one check
    assert rig.metric("partial_view") == 0
