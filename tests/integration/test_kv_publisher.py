"""The KV event publisher against raw ZeroMQ sockets: vLLM's live and replay wire."""

from __future__ import annotations

import errno
import threading

import msgspec
import pytest
import zmq

from edgellm.comm.errors import EndpointError
from edgellm.kvevents.publisher import END_SEQ, KVEventPublisher, PublisherConfig, offset_port
from edgellm.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
)

LOOPBACK = "tcp://127.0.0.1:*"
TIMEOUT_MS = 10_000


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _publisher(**kw) -> KVEventPublisher:
    return KVEventPublisher(PublisherConfig(pub_endpoint=LOOPBACK, replay_endpoint=LOOPBACK, **kw))


def _sub(ctx, endpoint):
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def _dealer(ctx, endpoint):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


def _replay(dealer, start: int) -> list[tuple[int, bytes]]:
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    out = []
    while True:
        assert dealer.poll(TIMEOUT_MS), "no replay answer"
        frames = dealer.recv_multipart()
        assert frames[0] == b"" and len(frames) == 3
        seq = int.from_bytes(frames[1], "big", signed=True)
        if seq == -1:
            assert frames[2] == b""
            return out
        out.append((seq, frames[2]))


def _connected_sub(ctx, pub: KVEventPublisher):
    """A SUB that is known to receive: publish probes until one arrives (slow joiner)."""
    sub = _sub(ctx, pub.pub_endpoint)
    while True:
        pub.publish([])
        if sub.poll(100):
            return sub


def _events(i: int):
    return [BlockStored([i, i + 1], None, list(range(8)), 4, None, "GPU", None), BlockRemoved([i])]


def test_live_stream_is_topic_seq_payload_with_seq_from_zero(ctx):
    with _publisher(topic="kv", data_parallel_rank=0) as pub:
        sub = _connected_sub(ctx, pub)
        while sub.poll(200):  # the probes
            sub.recv_multipart()
        first = pub.next_seq
        seqs = [pub.publish(_events(i), ts=100.0 + i) for i in range(5)]
        assert seqs == list(range(first, first + 5))
        for i, seq in enumerate(seqs):
            assert sub.poll(TIMEOUT_MS)
            topic, seq_bytes, payload = sub.recv_multipart()
            assert topic == b"kv"
            assert len(seq_bytes) == 8 and int.from_bytes(seq_bytes, "big") == seq
            assert decode_batch(payload) == EventBatch(100.0 + i, _events(i), 0)
        sub.close()


def test_first_sequence_number_is_zero(ctx):
    with _publisher() as pub:
        assert pub.next_seq == 0
        assert pub.publish([AllBlocksCleared()]) == 0
        dealer = _dealer(ctx, pub.replay_endpoint)
        assert [s for s, _ in _replay(dealer, 0)] == [0]
        dealer.close()


def test_replay_from_a_sequence_then_end_marker(ctx):
    with _publisher() as pub:
        payloads = {}
        for i in range(10):
            seq = pub.publish(_events(i), ts=float(i))
            payloads[seq] = EventBatch(float(i), _events(i), 0)
        dealer = _dealer(ctx, pub.replay_endpoint)
        got = _replay(dealer, 4)
        assert [s for s, _ in got] == list(range(4, 10))
        assert [decode_batch(p) for _, p in got] == [payloads[s] for s in range(4, 10)]
        assert _replay(dealer, 10) == []
        assert _replay(dealer, 2**63 - 1) == []
        dealer.close()


def test_replay_buffer_is_bounded(ctx):
    with _publisher(buffer_steps=3) as pub:
        for i in range(8):
            pub.publish(_events(i))
        dealer = _dealer(ctx, pub.replay_endpoint)
        assert [s for s, _ in _replay(dealer, 0)] == [5, 6, 7]
        dealer.close()


@pytest.mark.parametrize("request_frames", [[b"", b"\x00"], [b"only-one"], [b"", b"\x00" * 8, b"x"]])
def test_malformed_replay_request_gets_the_end_marker(ctx, request_frames):
    with _publisher() as pub:
        pub.publish(_events(0))
        dealer = _dealer(ctx, pub.replay_endpoint)
        dealer.send_multipart(request_frames)
        assert dealer.poll(TIMEOUT_MS)
        assert dealer.recv_multipart() == [b"", END_SEQ, b""]
        # and the publisher keeps serving
        assert [s for s, _ in _replay(dealer, 0)] == [0]
        dealer.close()


def test_concurrent_publishers_get_unique_ordered_sequence_numbers(ctx):
    with _publisher() as pub:
        results: list[list[int]] = [[] for _ in range(4)]

        def worker(i):
            for j in range(50):
                results[i].append(pub.publish([BlockRemoved([i * 1000 + j])]))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        all_seqs = sorted(s for r in results for s in r)
        assert all_seqs == list(range(200))
        for r in results:
            assert r == sorted(r)
        dealer = _dealer(ctx, pub.replay_endpoint)
        got = _replay(dealer, 0)
        assert [s for s, _ in got] == list(range(200))
        # each thread's batches appear in its own publish order
        by_seq = {s: decode_batch(p).events[0].block_hashes[0] for s, p in got}
        for i, r in enumerate(results):
            assert [by_seq[s] for s in r] == [i * 1000 + j for j in range(50)]
        dealer.close()


def test_map_style_and_rank_are_applied(ctx):
    with _publisher(style="map", data_parallel_rank=2) as pub:
        pub.publish(_events(1), ts=5.0)
        dealer = _dealer(ctx, pub.replay_endpoint)
        ((_, payload),) = _replay(dealer, 0)
        assert payload[:1] == b"\x93"  # [ts, events, rank]: current vLLM's array-like batch
        assert msgspec.msgpack.decode(payload)[1][0]["type"] == "BlockStored"  # map events
        assert decode_batch(payload) == EventBatch(5.0, _events(1), 2)
        dealer.close()


def test_publish_batch_keeps_its_own_rank_or_gets_the_publishers(ctx):
    with _publisher(data_parallel_rank=1) as pub:
        pub.publish(EventBatch(1.0, [], 7))
        pub.publish(EventBatch(1.0, []))
        dealer = _dealer(ctx, pub.replay_endpoint)
        ranks = [decode_batch(p).data_parallel_rank for _, p in _replay(dealer, 0)]
        assert ranks == [7, 1]
        dealer.close()


def test_connect_mode_publishes_to_a_bound_sub(ctx):
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    config = PublisherConfig(pub_endpoint=f"tcp://127.0.0.1:{port}", replay_endpoint=None, connect=True)
    with KVEventPublisher(config) as pub:
        while not sub.poll(100):
            pub.publish([AllBlocksCleared()])
        frames = sub.recv_multipart()
        assert decode_batch(frames[2]).events == [AllBlocksCleared()]
    sub.close()


def test_lifecycle_stop_is_idempotent_and_publish_after_stop_fails():
    pub = _publisher().start()
    with pytest.raises(RuntimeError):
        pub.start()
    pub.stop()
    pub.stop()
    with pytest.raises(RuntimeError):
        pub.publish([])
    never_started = _publisher()
    never_started.stop()
    never_started.stop()


def test_bind_failure_is_raised_by_start(ctx):
    blocker = ctx.socket(zmq.ROUTER)
    blocker.linger = 0
    port = blocker.bind_to_random_port("tcp://127.0.0.1")
    pub = KVEventPublisher(PublisherConfig(pub_endpoint=f"tcp://127.0.0.1:{port}", replay_endpoint=None))
    with pytest.raises(EndpointError) as raised:
        pub.start()
    assert raised.value.errno == errno.EADDRINUSE
    pub.stop()
    blocker.close()


def test_offset_port_for_data_parallel_ranks():
    assert offset_port("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_port("tcp://*:5557", 3) == "tcp://*:5560"
    assert offset_port("tcp://[::1]:5558", 1) == "tcp://[::1]:5559"
    assert offset_port("tcp://127.0.0.1:*", 2) == "tcp://127.0.0.1:*"
    assert offset_port("ipc:///tmp/kv", 2) == "ipc:///tmp/kv"
    with pytest.raises(ValueError):
        offset_port("tcp://host", 1)


def test_config_is_validated():
    for bad in ({"buffer_steps": 0}, {"max_queue": 0}, {"data_parallel_rank": -1}, {"style": "x"}):
        with pytest.raises(ValueError):
            PublisherConfig(**bad)
