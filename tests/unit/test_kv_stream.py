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


def test_lost_range_rebuilds_from_the_answer_itself(registry):
    stream, port = _started(registry)
    stream.on_live(9, b"j")
    assert port.take() == [("replay", 1)]
    _answer(stream, [(7, b"h"), (8, b"i"), (9, b"j")])  # the anchor (1) is gone
    # one clear, the publisher's batches in order; the held live 9 was a copy
    assert port.take() == [("clear",), ("batch", 7, b"h"), ("batch", 8, b"i"),
                           ("batch", 9, b"j"), ("answered",)]  # fmt: skip
    assert not stream.busy and stream.partial
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="range_lost") == 1
    assert _metric(registry, "kvcache_zmq_missed_events_total") == 7  # 2..8 never came live
    assert _metric(registry, "kvcache_zmq_partial_view") == 1


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


def test_sequence_backwards_is_verified_then_a_restart_follows_the_new_stream(registry):
    stream, port = _started(registry)
    stream.on_live(0, b"new0")
    assert port.take() == [("replay", 0)]  # are batches 0 and 1 still ours?
    _answer(stream, [(0, b"new0")])  # not our 0: a new stream
    assert port.take() == [("answered",), ("clear",), ("replay", 0)]
    _answer(stream, [(0, b"new0")])
    assert port.take() == [("batch", 0, b"new0"), ("answered",)]  # held copy dropped
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="restart") == 1
    assert not stream.busy and not stream.partial


def test_bogus_seq_behind_the_stream_is_dropped_without_a_clear(registry):
    stream, port = _started(registry)
    stream.on_live(2, b"c")
    stream.on_live(0, b"never sent")  # well-formed, behind, not a copy
    assert port.take() == [("batch", 2, b"c"), ("replay", 0)]  # check from the suspect on
    stream.on_live(3, b"d")  # held meanwhile
    _answer(stream, [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")])  # all ours: same stream
    assert port.take() == [("batch", 3, b"d"), ("answered",)]
    assert _metric(registry, "kvcache_zmq_errors_total", error_type="stale_batch") == 1
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="restart") == 0
    assert not stream.busy


def test_real_batch_arriving_after_a_bogus_one_took_its_seq_rebuilds_the_pod(registry):
    stream, port = _started(registry)
    stream.on_live(2, b"bogus")  # cannot be told apart yet: applied
    stream.on_live(3, b"d")
    stream.on_live(2, b"c")  # the real 2, late: the check shows ours is not the publisher's
    assert port.take() == [("batch", 2, b"bogus"), ("batch", 3, b"d"), ("replay", 2)]
    _answer(stream, [(2, b"c"), (3, b"d")])
    assert port.take() == [("answered",), ("clear",), ("replay", 0)]
    _answer(stream, [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")])
    assert [e[1:] for e in port.take() if e[0] == "batch"] == [(0, b"a"), (1, b"b"), (2, b"c"),
                                                               (3, b"d")]  # fmt: skip
    assert not stream.busy


def test_restart_while_a_replay_is_outstanding_restarts_the_channel_once(registry):
    stream, port = _started(registry)
    stream.probe()
    stream.on_live(2, b"old2")  # held: the old engine's last words
    stream.on_live(0, b"new0")  # seq back: the engine restarted?
    stream.on_live(1, b"new1")  # the check is already on its way: no second restart
    assert port.take() == [("replay", 1), ("restart_channel",), ("replay", 0)]
    _answer(stream, [(0, b"new0"), (1, b"new1")])  # not our 0: a new stream
    assert port.take() == [("answered",), ("clear",), ("replay", 0)]
    _answer(stream, [(0, b"new0"), (1, b"new1")])
    assert [e for e in port.take() if e[0] == "batch"] == [("batch", 0, b"new0"),
                                                           ("batch", 1, b"new1")]  # fmt: skip
    # old2 arrived before the rebuild was asked for and the new stream has no 2: stale
    assert _metric(registry, "kvcache_zmq_errors_total", error_type="stale_batch") == 1
    assert not stream.busy


def test_gap_without_replay_channel_clears_and_follows_then_rebuilds(registry):
    stream, port = _started(registry)
    port.up = False
    stream.on_live(5, b"f")
    assert port.take() == [("clear",), ("batch", 5, b"f")]
    assert stream.degraded
    port.up = True
    stream.on_reconnected()
    assert port.take() == [("replay", 0)]  # the clear waits for an answer
    _answer(stream, [(4, b"e"), (5, b"f")])
    assert port.take() == [("clear",), ("batch", 4, b"e"), ("batch", 5, b"f"), ("answered",)]
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="gap_unrecoverable") == 1
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="recover") == 1
    assert not stream.degraded


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


def test_replay_buffer_shorter_than_the_gap_settles_after_one_rebuild(registry):
    """The fault-matrix case: 12 live batches lost, a 5-batch buffer, a fast engine. The
    held live batches older than the buffer are dropped, never a reason to start over."""
    stream, port = _stream(registry)
    stream.start()
    _answer(stream, [])
    for seq in [*range(10), *range(22, 31)]:  # 10..21 lost on the network
        stream.on_live(seq, b"b%d" % seq)
    assert port.take()[-1] == ("replay", 9)
    _answer(stream, [(s, b"b%d" % s) for s in range(26, 31)])
    log = port.take()
    assert log[0] == ("clear",) and [e[1] for e in log if e[0] == "batch"] == list(range(26, 31))
    assert not stream.busy
    stream.on_live(31, b"b31")
    assert port.take() == [("batch", 31, b"b31")]
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="range_lost") == 1
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="restart") == 0
    assert _metric(registry, "kvcache_zmq_missed_events_total") == 12  # what the network lost
    assert _metric(registry, "kvcache_zmq_errors_total", error_type="stale_batch") == 4  # 22..25


def test_late_start_without_the_first_batches_counts_them_and_marks_the_view_partial(registry):
    stream, port = _stream(registry)
    stream.start()
    _answer(stream, [(s, b"b%d" % s) for s in range(30, 40)])
    assert [e[1] for e in port.take() if e[0] == "batch"] == list(range(30, 40))
    assert _metric(registry, "kvcache_zmq_missed_events_total") == 30
    assert _metric(registry, "kvcache_zmq_partial_view") == 1
    assert stream.partial


def test_recovered_live_gap_is_counted_as_missed(registry):
    stream, port = _started(registry)
    stream.on_live(7, b"h")  # 2..6 lost on the network
    _answer(stream, [(1, b"b"), *((s, b"x%d" % s) for s in range(2, 7)), (7, b"h")])
    assert [e[1] for e in port.take() if e[0] == "batch"] == [2, 3, 4, 5, 6, 7]
    assert _metric(registry, "kvcache_zmq_missed_events_total") == 5
    assert _metric(registry, "kvcache_zmq_resyncs_total", reason="range_lost") == 0


def test_seq_far_ahead_is_never_counted_as_missed(registry):
    stream, port = _started(registry)
    stream.on_live(2**63 - 1, b"bogus")
    _answer(stream, [(1, b"b")])
    assert _metric(registry, "kvcache_zmq_missed_events_total") == 0
    assert _metric(registry, "kvcache_zmq_errors_total", error_type="stale_batch") == 1
    assert not stream.busy


def test_bogus_batch_at_the_next_seq_is_undone_by_the_real_one(registry):
    stream, port = _started(registry)
    stream.on_live(2, b"bogus")  # cannot be told apart: applied
    stream.on_live(2, b"c")  # the real one: behind now, not a copy
    _answer(stream, [(2, b"c")])  # not the 2 we applied
    assert port.take() == [("batch", 2, b"bogus"), ("replay", 2), ("answered",), ("clear",),
                           ("replay", 0)]  # fmt: skip
    _answer(stream, [(0, b"a"), (1, b"b"), (2, b"c")])
    assert [e[1:] for e in port.take() if e[0] == "batch"] == [(0, b"a"), (1, b"b"), (2, b"c")]
    assert not stream.busy
