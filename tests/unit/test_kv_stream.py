"""PodStream, the pure sequencing logic of one pod, driven step by step."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from edgellm.kvevents.metrics import KVEventMetrics
from edgellm.kvevents.stream import PodStream


class Port:
    """Records what the stream does; the queue holds ``capacity`` batches."""

    def __init__(self, capacity: int = 1000):
        self.capacity = capacity
        self.up = True
        self.log: list[tuple] = []
        self.queued = 0

    @property
    def replay_channel_up(self) -> bool:
        return self.up

    def submit(self, seq, payload):
        if self.queued >= self.capacity:
            return False
        self.queued += 1
        self.log.append(("batch", seq, payload))
        return True

    def clear(self):
        self.log.append(("clear",))

    def send_replay_request(self, start):
        self.log.append(("replay", start))

    def restart_replay_channel(self):
        self.log.append(("restart_channel",))

    def replay_answered(self):
        self.log.append(("answered",))

    def take(self) -> list[tuple]:
        out, self.log = self.log, []
        return out


@pytest.fixture
def registry():
    return CollectorRegistry()


def _stream(registry, **port_kw) -> tuple[PodStream, Port]:
    port = Port(**port_kw)
    stream = PodStream("p", port, KVEventMetrics(registry).for_pod("p"))
    return stream, port


def _metric(registry, name, **labels):
    return registry.get_sample_value(name, {"pod_key": "p", **labels}) or 0.0


def _answer(stream, items):
    for seq, payload in items:
        stream.on_replay_item(seq, payload)
    stream.on_replay_end()


def _started(registry, buffered=((0, b"a"), (1, b"b"))):
    stream, port = _stream(registry)
    stream.start()
    _answer(stream, buffered)
    port.take()
    return stream, port


def test_start_clears_replays_from_zero_and_applies_in_order(registry):
    stream, port = _stream(registry)
    stream.start()
    assert port.take() == [("clear",), ("replay", 0)]
    stream.on_live(3, b"d")  # held while the replay is outstanding
    _answer(stream, [(0, b"a"), (1, b"b"), (2, b"c")])
    assert port.take() == [("batch", 0, b"a"), ("batch", 1, b"b"),
                           ("batch", 2, b"c"), ("answered",), ("batch", 3, b"d")]  # fmt: skip
    assert not stream.busy
    assert _metric(registry, "kvcache_zmq_replayed_batches_total") == 3  # 3 replayed, 1 live


def test_empty_publisher_means_the_stream_starts_at_zero(registry):
    stream, port = _started(registry, buffered=())
    assert stream.next_seq == 0
    stream.on_live(1, b"b")  # 0 was lost before the SUB joined: a gap, replayed
    assert port.take() == [("replay", 0)]


def test_live_copy_of_a_replayed_batch_is_dropped_once(registry):
    stream, port = _started(registry)
    stream.on_live(1, b"b")
    stream.on_live(2, b"c")
    assert port.take() == [("batch", 2, b"c")]
    assert _metric(registry, "kvcache_zmq_duplicate_batches_total") == 1


def test_gap_replay_is_anchored_and_fills_the_range(registry):
    stream, port = _started(registry)
    stream.on_live(4, b"e")
    assert port.take() == [("replay", 1)]  # anchored on the last submitted batch
    _answer(stream, [(1, b"b"), (2, b"c"), (3, b"d"), (4, b"e")])
    assert port.take() == [("batch", 2, b"c"), ("batch", 3, b"d"),
                           ("batch", 4, b"e"), ("answered",)]  # fmt: skip
    stream.on_live(5, b"f")
    assert port.take() == [("batch", 5, b"f")]


def test_lost_range_resyncs_from_what_the_publisher_holds(registry):
    stream, port = _started(registry)
    stream.on_live(9, b"j")
    port.take()
    _answer(stream, [(7, b"h"), (8, b"i"), (9, b"j")])  # the anchor (1) is gone
    assert port.take() == [("answered",), ("clear",), ("replay", 0)]
    _answer(stream, [(7, b"h"), (8, b"i"), (9, b"j")])
    assert [e[1] for e in port.take() if e[0] == "batch"] == [7, 8, 9]
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="range_lost") == 1
    assert _metric(registry, "kvcache_zmq_missed_events_total") == 5  # 2..6


def test_changed_anchor_means_restart(registry):
    stream, port = _started(registry)
    stream.probe()
    assert port.take() == [("replay", 1)]
    _answer(stream, [(1, b"other"), (2, b"x")])
    assert port.take() == [("answered",), ("clear",), ("replay", 0)]
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="restart") == 1


def test_empty_anchored_answer_means_restart(registry):
    stream, port = _started(registry)
    stream.probe()
    port.take()
    _answer(stream, [])
    assert port.take() == [("answered",), ("clear",), ("replay", 0)]


def test_sequence_backwards_is_a_restart_and_follows_the_new_stream(registry):
    stream, port = _started(registry)
    stream.on_live(0, b"new0")
    assert port.take() == [("clear",), ("replay", 0)]
    _answer(stream, [(0, b"new0")])
    assert port.take() == [("batch", 0, b"new0"), ("answered",)]  # held copy dropped


def test_restart_while_a_replay_is_outstanding_cancels_it(registry):
    stream, port = _started(registry)
    stream.probe()
    stream.on_live(2, b"old2")  # held: the old engine's last words
    stream.on_live(0, b"new0")  # seq back: the engine restarted
    assert port.take() == [("replay", 1), ("restart_channel",), ("clear",), ("replay", 0)]
    _answer(stream, [(0, b"new0")])
    assert [e for e in port.take() if e[0] == "batch"] == [("batch", 0, b"new0")]


def test_gap_without_replay_channel_clears_and_follows_then_rebuilds(registry):
    stream, port = _started(registry)
    port.up = False
    stream.on_live(5, b"f")
    assert port.take() == [("clear",), ("batch", 5, b"f")]
    assert stream.degraded
    port.up = True
    stream.on_reconnected()
    assert port.take() == [("clear",), ("replay", 0)]
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="gap_unrecoverable") == 1
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="recover") == 1


def test_failed_replay_keeps_the_anchor_and_resumes_from_it(registry):
    stream, port = _started(registry)
    stream.on_live(3, b"d")
    port.take()
    stream.on_replay_item(1, b"b")
    stream.on_replay_item(2, b"c")
    port.up = False
    stream.on_replay_failed()  # held 3 now applies: it follows 2 directly
    assert port.take() == [("batch", 2, b"c"), ("batch", 3, b"d")]
    port.up = True
    stream.on_reconnected()
    assert port.take() == [("replay", 3)]


def test_overflow_drops_live_then_recovers_by_replay(registry):
    stream, port = _started(registry)
    port.capacity = port.queued  # the queue is full from now on
    stream.on_live(2, b"c")
    stream.on_live(3, b"d")
    assert stream.overflowed and port.take() == []
    assert _metric(registry, "kvcache_zmq_queue_overflows_total") == 2
    assert not stream.recover_overflow(queue_depth=10, capacity=10)
    port.capacity = 1000
    assert stream.recover_overflow(queue_depth=5, capacity=10)
    assert port.take() == [("replay", 1)]
    _answer(stream, [(1, b"b"), (2, b"c"), (3, b"d")])
    assert [e[1] for e in port.take() if e[0] == "batch"] == [2, 3]


def test_stale_live_batch_is_skipped_after_the_replay_lacks_it(registry):
    stream, port = _started(registry)
    stream.on_live(7, b"stale")
    port.take()
    _answer(stream, [(1, b"b")])  # the publisher ends at 1
    assert port.take() == [("answered",)]
    assert _metric(registry, "kvcache_zmq_errors_total", error_type="stale_batch") == 1
    stream.on_live(2, b"c")
    assert port.take() == [("batch", 2, b"c")]


def test_replay_frames_without_a_request_are_protocol_errors(registry):
    stream, _ = _started(registry)
    stream.on_replay_item(5, b"x")
    stream.on_replay_end()
    assert _metric(registry, "kvcache_zmq_errors_total", error_type="replay_protocol") == 2


def test_hole_in_a_replay_answer_asks_again(registry):
    stream, port = _started(registry)
    stream.on_live(5, b"f")
    port.take()
    _answer(stream, [(1, b"b"), (2, b"c"), (4, b"e"), (5, b"f")])  # 3 cut by a HWM
    assert port.take() == [("batch", 2, b"c"), ("answered",), ("replay", 2)]
