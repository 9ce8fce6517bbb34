"""PodStream against a simulated publisher, network and index queue (model-based).

Hypothesis generates runs of: batches published, live frames delivered, dropped,
duplicated, reordered, well-formed frames with seqs the engine never sent (behind, at,
ahead of the stream), engine restarts (seq back to 0, empty buffer, frames of the old
engine still in flight), replay requests served now or later and read interleaved with
live frames, answers cut by a hole, requests lost or timed out, the replay channel
coming back, idle probes, a slow index (a tiny queue), index errors. After the run the
faults stop and the world settles: everything in flight is delivered, requests are
answered, probes find nothing new.

Checked: every step keeps the run since the pod's last clear one consecutive stretch of
one engine's stream; the world settles within a bounded number of rounds (no resync or
replay loop); clears stay within a bound of the faults that can cause one; afterwards
the pod holds exactly the current engine's batches from no later than the oldest one it
can still replay up to its last one, each once, in order, and nothing it never sent.
"""

from __future__ import annotations

from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from edgellm.kvevents.metrics import KVEventMetrics
from edgellm.kvevents.stream import PodStream

SETTLE_ROUNDS = 60


class Publisher:
    """An engine's publisher: a sequence from 0 per incarnation, a bounded buffer."""

    def __init__(self, buffer: int):
        self.incarnation = 0
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer)

    def payload(self, seq: int) -> bytes:
        return b"%d:%d" % (self.incarnation, seq)

    def publish(self) -> tuple[int, bytes]:
        frame = (self.seq, self.payload(self.seq))
        self.seq += 1
        self.buffer.append(frame)
        return frame

    def restart(self) -> None:
        self.incarnation += 1
        self.seq = 0
        self.buffer.clear()


class World:
    """The stream's port, the network and the index queue."""

    def __init__(self, publisher: Publisher, *, capacity: int, hold: int, window: int):
        self.pub = publisher
        self.capacity = capacity
        self.up = True
        self.queue: deque[tuple] = deque()
        self.run: list[tuple[int, bytes]] = []  # what the index holds since the last clear
        self.clears = 0
        self.requests = 0
        self.inflight: list[tuple[int, bytes, int]] = []  # seq, payload, connection
        self.link = 0  # the connection the last live frame came over
        self.delivered: set[bytes] = set()  # payloads that reached the stream live
        self.request: tuple[int, int] | None = None  # (start, incarnation asked)
        self.answer: deque | None = None  # served, being read
        self.lost = False  # the request went to an engine that died
        self.stream = PodStream("p", self, KVEventMetrics(CollectorRegistry()).for_pod("p"),
                                hold_capacity=hold, copy_window=window)  # fmt: skip

    # --- StreamPort ------------------------------------------------------------------

    @property
    def replay_channel_up(self) -> bool:
        return self.up

    def submit(self, seq, payload):
        if len(self.queue) >= self.capacity:
            return False
        self.queue.append(("batch", seq, payload))
        return True

    def clear(self):
        self.queue.append(("clear",))

    def send_replay_request(self, start):
        assert self.up, "a replay request without a replay channel"
        assert self.request is None and self.answer is None, "two requests outstanding"
        self.requests += 1
        self.request = (start, self.pub.incarnation)

    def restart_replay_channel(self):
        self.request = None
        self.answer = None
        self.lost = False

    def replay_answered(self):
        pass

    # --- the index ---------------------------------------------------------------------

    def apply(self, n: int) -> None:
        for _ in range(min(n, len(self.queue))):
            item = self.queue.popleft()
            if item[0] == "clear":
                self.clears += 1
                self.run = []
            else:
                _, seq, payload = item
                if self.run:
                    assert seq == self.run[-1][0] + 1, f"not consecutive: {self.run[-1][0]} {seq}"
                self.run.append((seq, payload))
        if self.up and self.stream.pending is None:
            self.stream.recover_overflow(len(self.queue), self.capacity)

    # --- the replay side ---------------------------------------------------------------

    def serve(self) -> None:
        if self.request is None:
            return
        start, incarnation = self.request
        self.request = None
        if incarnation != self.pub.incarnation:
            self.lost = True  # the engine that got it is gone: never answered
            return
        self.answer = deque((s, p) for s, p in self.pub.buffer if s >= start)
        self.answer.append(None)

    def read(self, n: int, *, hole: bool = False) -> None:
        if self.answer is None:
            return
        if hole and len(self.answer) > 3:
            del self.answer[1]  # the publisher's HWM cut one message
        for _ in range(n):
            if self.answer is None or not self.answer:
                return
            item = self.answer.popleft()
            if item is None:
                self.answer = None
                self.stream.on_replay_end()
            else:
                self.stream.on_replay_item(*item)

    def time_out(self) -> None:
        if self.stream.pending is not None:
            self.request = self.answer = None
            self.lost = False
            self.up = False  # the port closes the replay channel
            self.stream.on_replay_failed()

    def reconnect(self) -> None:
        if not self.up:
            self.up = True
            self.stream.on_reconnected()

    # --- the live side -------------------------------------------------------------------

    def deliver(self, n: int) -> None:
        for _ in range(min(n, len(self.inflight))):
            seq, payload, link = self.inflight.pop(0)
            if link != self.link:  # a new TCP connection (the socket monitor tells)
                self.link = link
                self.stream.on_link_reset()
            self.delivered.add(payload)
            self.stream.on_live(seq, payload)


ACTIONS = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 6)),
    st.tuples(st.just("deliver"), st.integers(1, 8)),
    st.tuples(st.just("drop"), st.integers(1, 8)),
    st.just(("dup",)),
    st.just(("swap",)),
    st.tuples(st.just("bogus"), st.sampled_from([-40, -3, -1, 0, 1, 2, 50, 2**62])),
    st.just(("restart",)),
    st.just(("serve",)),
    st.tuples(st.just("read"), st.integers(1, 20), st.booleans()),
    st.just(("timeout",)),
    st.just(("reconnect",)),
    st.just(("probe",)),
    st.tuples(st.just("apply"), st.integers(1, 10)),
    st.just(("index_error",)),
)
FAULTS = {"drop", "dup", "swap", "bogus", "restart", "timeout", "index_error"}


def _step(w: World, action: tuple) -> None:
    kind = action[0]
    if kind == "publish":
        for _ in range(action[1]):
            w.inflight.append((*w.pub.publish(), w.pub.incarnation))
    elif kind == "deliver":
        w.deliver(action[1])
    elif kind == "drop":
        del w.inflight[: action[1]]
    elif kind == "dup" and w.inflight:
        w.inflight.insert(0, w.inflight[0])
    elif kind == "swap" and len(w.inflight) > 1:
        w.inflight[0], w.inflight[1] = w.inflight[1], w.inflight[0]
    elif kind == "bogus":
        seq = max(0, w.pub.seq + action[1])
        w.inflight.insert(0, (seq, b"bogus:%d" % seq, w.link))
    elif kind == "restart":
        w.pub.restart()
    elif kind == "serve":
        w.serve()
    elif kind == "read":
        w.read(action[1], hole=action[2])
    elif kind == "timeout":
        w.time_out()
    elif kind == "reconnect":
        w.reconnect()
    elif kind == "probe" and w.up:
        w.stream.probe()
    elif kind == "apply":
        w.apply(action[1])
    elif kind == "index_error" and w.up and w.stream.pending is None:
        w.stream.resync("index_error")


def _settle(w: World) -> int:
    """Stop the faults and let everything arrive; the rounds it took (fails if endless)."""
    for rounds in range(1, SETTLE_ROUNDS + 1):
        w.deliver(len(w.inflight))
        w.apply(len(w.queue))
        w.reconnect()
        if w.lost:  # nobody will ever answer: the port's timeout fires
            w.time_out()
            continue
        if w.stream.pending is not None:
            w.serve()
            w.read(10**6)
            continue
        if w.stream.busy or w.queue:
            continue
        w.stream.probe()
        w.serve()
        before = list(w.run)
        w.read(10**6)
        w.apply(len(w.queue))
        if w.run == before and not w.stream.busy and not w.stream.degraded and not w.queue:
            return rounds
    raise AssertionError(f"not settled after {SETTLE_ROUNDS} rounds: pending="
                         f"{w.stream.pending} busy={w.stream.busy} clears={w.clears}")


@settings(max_examples=int(__import__("os").environ.get("MODEL_EXAMPLES", "400")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    actions=st.lists(ACTIONS, max_size=60),
    buffer=st.sampled_from([1, 2, 5, 10, 1000]),
    capacity=st.sampled_from([3, 8, 1000]),
    hold=st.sampled_from([4, 1000]),
    window=st.sampled_from([2, 4096]),
)
def test_the_stream_settles_on_exactly_what_the_publisher_can_replay(actions, buffer, capacity,
                                                                     hold, window):  # fmt: skip
    w = World(Publisher(buffer), capacity=capacity, hold=hold, window=window)
    w.stream.start()
    for action in actions:
        _step(w, action)
        w.apply(0)  # checks that the queue only ever asks for consecutive batches
    faults = sum(1 for a in actions if a[0] in FAULTS)
    requests_before = w.requests
    _settle(w)
    # bounded work after the faults: no loop
    assert w.requests - requests_before <= 2 * SETTLE_ROUNDS
    assert w.clears <= 2 + 3 * faults, (w.clears, faults)
    pub = w.pub
    seqs = [s for s, _ in w.run]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
    oldest = pub.buffer[0][0] if pub.buffer else pub.seq
    for s, p in w.run[-window:]:  # what the stream can compare
        # A well-formed frame that took the seq of a real one is found out only if the real
        # one arrives too while the publisher still holds it.
        undetectable = s < oldest or pub.payload(s) not in w.delivered
        assert p == pub.payload(s) or (p.startswith(b"bogus") and undetectable), (s, p)
    if pub.buffer:
        assert seqs and seqs[-1] == pub.seq - 1, "the last batch is missing"
        assert w.run[-1][1] == pub.payload(pub.seq - 1)
        assert seqs[0] <= pub.buffer[0][0], "a batch the publisher still holds is missing"
        assert w.stream.partial == (seqs[0] > 0)
    else:
        assert seqs == [], "entries of a stream the engine no longer has"


def test_the_settling_procedure_itself_settles_a_quiet_stream():
    w = World(Publisher(10), capacity=100, hold=100, window=64)
    w.stream.start()
    assert _settle(w) <= 3
    assert w.run == [] and not w.stream.busy
