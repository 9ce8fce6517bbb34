"""CURVE between boxes, with real sockets: a KV event publisher with a keypair and a
directory of allowed subscribers; our subscriber with the right keys gets every batch (live
and replayed), one whose key is not allowed, one that expects another server and one
without CURVE get nothing - nor does a raw vLLM-style SUB/DEALER."""

from __future__ import annotations

import time

import pytest
import zmq

from edgellm.comm.curve import CurveClient, CurveKeyError, CurveServer, create_keypair
from edgellm.discovery.pod import Pod
from edgellm.discovery.provider import StaticPodProvider
from edgellm.kvevents.config import ManagerConfig, SubscriberConfig
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvevents.publisher import KVEventPublisher, PublisherConfig
from edgellm.kvindex.memory import MemoryPrefixIndex
from edgellm.protocol.kv_events import BlockStored

pytestmark = pytest.mark.usefixtures("no_endpoint_left")

BLOCK = 4


@pytest.fixture
def keys(tmp_path):
    """Keypairs: the publisher's, an allowed subscriber's, an intruder's (not allowed)."""
    allowed = tmp_path / "allowed"
    out = {"server": create_keypair(str(tmp_path / "server"), "server"),
           "client": create_keypair(str(tmp_path / "client"), "client"),
           "intruder": create_keypair(str(tmp_path / "intruder"), "intruder"),
           "other_server": create_keypair(str(tmp_path / "other"), "other")}  # fmt: skip
    allowed.mkdir()
    (allowed / "client.key").write_bytes((tmp_path / "client" / "client.key").read_bytes())
    out["allowed"] = str(allowed)
    return out


def _stored(i: int) -> list[BlockStored]:
    return [BlockStored([1000 + i], None if i == 0 else 999 + i, [i] * BLOCK, BLOCK)]


def _manager(pub: KVEventPublisher, curve: CurveClient | None):
    pod = Pod("box/llm", "127.0.0.1", "m", pub_port=int(pub.pub_endpoint.rsplit(":", 1)[1]),
              router_port=int(pub.replay_endpoint.rsplit(":", 1)[1]))  # fmt: skip
    index = MemoryPrefixIndex()
    config = ManagerConfig(enabled=True, subscriber=SubscriberConfig(
        curve=curve, replay_timeout=0.5, reconnect_delay=0.2, idle_probe_interval=0.3))
    manager = KVEventManager(StaticPodProvider([pod]), index, config=config)
    manager.start()
    return manager, index


def _held(index: MemoryPrefixIndex, n: int) -> int:
    tokens = [t for i in range(n) for t in [i] * BLOCK]
    match = index.match_prefix(("m", -1), tokens, None).get("box/llm")
    return 0 if match is None else match.matched_blocks


def test_only_the_keyed_subscriber_gets_the_batches(keys, sockets):
    server = CurveServer.from_files(keys["server"][1], keys["allowed"])
    config = PublisherConfig(pub_endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*",
                             curve=server)  # fmt: skip
    with KVEventPublisher(config) as pub:
        for i in range(3):  # before anyone subscribed: only a replay can deliver these
            pub.publish(_stored(i))
        clients = {
            "keyed": CurveClient.from_files(keys["client"][1], keys["server"][0]),
            "intruder": CurveClient.from_files(keys["intruder"][1], keys["server"][0]),
            "wrong server key": CurveClient.from_files(keys["client"][1], keys["other_server"][0]),
            "no curve": None,
        }
        running = {name: _manager(pub, curve) for name, curve in clients.items()}
        raw_sub = sockets(zmq.SUB)
        raw_sub.setsockopt(zmq.SUBSCRIBE, b"")
        raw_sub.connect(pub.pub_endpoint)
        raw_dealer = sockets(zmq.DEALER)
        raw_dealer.connect(pub.replay_endpoint)
        raw_dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        try:
            keyed_manager, keyed_index = running["keyed"]
            deadline = time.monotonic() + 20
            i = 3
            while _held(keyed_index, i) < i:
                assert time.monotonic() < deadline, "the keyed subscriber never got the batches"
                pub.publish(_stored(i))
                i += 1
                time.sleep(0.05)
            for _ in range(5):  # live batches while everyone is connected
                pub.publish(_stored(i))
                i += 1
            assert keyed_manager.wait_applied("box/llm", pub.next_seq - 1, 10)
            assert _held(keyed_index, i) == i  # everything, the replayed start included
            time.sleep(1.0)  # the others had every chance: replays, probes, reconnects
            for name, (_, index) in running.items():
                if name != "keyed":
                    assert index.stats()["blocks"] == 0, name
            assert not raw_sub.poll(0) and not raw_dealer.poll(0)
        finally:
            for manager, index in running.values():
                manager.stop()
                index.close()


def test_key_files_must_be_usable(keys, tmp_path):
    with pytest.raises(CurveKeyError, match="no secret key"):
        CurveServer.from_files(keys["server"][0], keys["allowed"])  # the public half
    with pytest.raises(CurveKeyError, match="not a directory"):
        CurveServer.from_files(keys["server"][1], str(tmp_path / "nowhere"))
    with pytest.raises(CurveKeyError, match="cannot read"):
        CurveClient.from_files(str(tmp_path / "missing.key_secret"), keys["server"][0])
    with pytest.raises(ValueError, match="connects"):
        PublisherConfig(connect=True, curve=CurveServer.from_files(keys["server"][1], keys["allowed"]))
