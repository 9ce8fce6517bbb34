"""One pod's stream of batches: which ones reach the index, in what order (pure logic).

No sockets, threads or clocks: :class:`PodStream` is fed live batches, replay answers and
replay failures by the pod's socket thread (``edgellm.kvevents.subscriber``) and acts
through a :class:`StreamPort` (queue a batch or a clear for the index, send a replay
request, restart the replay channel).

Guarantees (spec 2 §4, beyond AIBrix). Since the pod's last clear, the batches submitted
are one consecutive run ``a, a+1, ..., b`` of one publisher's stream, so the index holds
exactly what those batches leave (never a hole, never a batch twice). ``a`` is 0, or the
oldest batch the publisher still held when the run began (then ``partial`` is set: the
engine may hold blocks of batches nobody can replay).

The rules:

- *the publisher's replay is the authority, live copies are a fast path*: a live batch
  with the next seq is submitted at once. A live batch beyond a gap, or any live batch
  while a replay is outstanding, is *held*; one behind the stream that is not a copy of
  a batch submitted (or a second batch for a held seq) is a *suspect*. A replay answer
  decides on every held batch and suspect that arrived before its request was sent (the
  publisher had published them by then): byte-identical to the publisher's batch of its
  seq, it is a duplicate; other bytes, older than anything the publisher still holds, or
  beyond the answer's end (never sent), it is dropped as ``stale_batch``. Held batches
  are never a reason to clear: each clear needs a new input, so no state repeats.
- *replays check what was submitted*: a replay asked for after the run begins starts
  inside it (at its last batch, or at the oldest suspect still in the last
  ``copy_window`` batches) and every batch of the answer up to the run's end must equal
  the one submitted (compared by hash): that proves the same stream; what follows is
  submitted in order. A gap (a live seq beyond the next one) asks for such a replay.
- *ranges lost*: if the answer begins after the run's end, the publisher no longer holds
  what followed it: the pod is cleared (``range_lost``) and rebuilt from that answer.
- *restart*: an answer that differs from a submitted batch, or holds nothing at or after
  the run's last batch, means a new stream: the pod is cleared (``restart``) and rebuilt
  from a replay from 0, which also decides on the batches held meanwhile. A suspect, and
  a re-established live connection (:meth:`PodStream.on_link_reset`), ask for such a
  check before anything held is trusted; a request outstanding that got nothing back yet
  is abandoned for it (the replay channel restarted: a dying engine never answers), at
  most once per request for suspects.
- *replay channel down* (a request timed out): the live stream is followed as it comes; a
  gap or a restart then clears the pod (``gap_unrecoverable`` / ``restart``), and the pod
  is rebuilt once the channel is back (``recover``: its clear waits for the answer, so an
  unreachable replay endpoint never empties a followed pod).
- *bounded memory*: a submit refused because the pod's queue is full is counted
  (``queue_overflows``); live batches are then dropped until :meth:`PodStream.recover_overflow`
  finds the queue half empty and replays from the last submitted batch. At most
  ``hold_capacity`` batches wait; more are dropped and counted the same way.

Counting: ``missed_events`` and ``partial_view`` as ``edgellm.kvevents.metrics`` says
(live gaps are counted once the batch after them proves genuine, never for a bogus seq).
"""

from __future__ import annotations

import logging
from array import array
from typing import Protocol

from xxhash import xxh3_64_intdigest

from edgellm.kvevents.metrics import PodMetrics
from edgellm.kvevents.waiting import Live, Replay, WaitingRoom

log = logging.getLogger(__name__)

COPY_WINDOW = 4096  # submitted batches remembered (by digest) to check replays and copies


def batch_digest(payload: bytes) -> int:
    """A batch's digest, the same in every process (``hash()`` is not): replays are checked
    against it, and a replica taking a pod over checks the stream it resumes with it."""
    return xxh3_64_intdigest(payload) - (1 << 63)  # signed: it goes in an array('q')


class StreamPort(Protocol):
    """What a :class:`PodStream` acts on (the pod's socket thread implements it)."""

    @property
    def replay_channel_up(self) -> bool:
        """A replay request can be sent now (the DEALER exists)."""

    def submit(self, seq: int, payload: bytes) -> bool:
        """Queue the batch for the index; False (and nothing queued) if the queue is full."""

    def clear(self) -> None:
        """Queue a clear of the pod's entries (ordered with the batches)."""

    def send_replay_request(self, start: int) -> None:
        """Ask the publisher for every batch from ``start`` (the port times it out)."""

    def restart_replay_channel(self) -> None:
        """Replace the replay channel: answers to earlier requests must never arrive."""

    def replay_answered(self) -> None:
        """A replay was answered to its end marker: the publisher is reachable."""


class PodStream:
    """The sequencing state of one pod's stream (see the module docstring)."""

    def __init__(self, pod_key: str, port: StreamPort, metrics: PodMetrics, *,
                 hold_capacity: int = 100_000, copy_window: int = COPY_WINDOW):  # fmt: skip
        self.pod_key = pod_key
        self._port = port
        self.metrics = metrics
        # next seq to submit; None: not known yet; == _first: known, nothing submitted yet
        self.next_seq: int | None = None
        self._first = 0  # first seq of the run
        self._window = copy_window
        self._copies = array("q", bytes(8 * copy_window))  # hash of batch s at s % window
        self._waiting = WaitingRoom(hold_capacity)
        self._held = self._waiting.held
        self._live_mark = -1  # highest live seq seen in this stream (gap baseline)
        self._requests = 0
        self.pending: Replay | None = None
        self._doubt = False  # a check is due once the outstanding answer has ended
        self.degraded = False  # followed live without replay: rebuild when possible
        self.overflowed = False
        self.partial = False

    @property
    def busy(self) -> bool:
        """A replay is outstanding, live batches wait, or the queue overflowed."""
        return self.pending is not None or len(self._waiting) > 0 or self.overflowed

    # --- inputs ------------------------------------------------------------------------

    def start(self) -> None:
        """A new subscription: the pod's entries may be stale; clear, then replay all."""
        self._port.clear()
        self._request(0, purpose="start")

    def resume(self, seq: int, digest: int) -> None:
        """Instead of :meth:`start`: take the pod over from another writer of a shared
        index, whose last applied batch was ``seq`` (of digest ``digest``). Nothing is
        cleared: a replay from ``seq`` checks that batch (same stream) and continues after
        it; a restarted publisher or a range it no longer holds clears and rebuilds as
        usual. Whether that writer's view was partial is not known here."""
        self.next_seq = seq + 1
        self._first = seq
        self._copies[seq % self._window] = digest
        self._set_partial(False)
        self._request_check("resume")

    def on_live(self, seq: int, payload: bytes) -> None:
        if self.overflowed:
            self._live_mark = max(self._live_mark, seq)  # dropped here, not on the network
            self.metrics.queue_overflows.inc()
            return
        nxt = self.next_seq
        if nxt is not None and seq < nxt:
            if self._is_copy(seq, payload):
                self.metrics.duplicates.inc()
            elif self.pending is None and not self._port.replay_channel_up:
                self._follow(seq, payload)
            elif self._room():
                self._waiting.suspect(seq, Live(payload, self._requests))
                log.debug("%s: sequence went back to %d: checking the stream", self.pod_key, seq)
                self._check("verify")
            return
        if self.pending is None:
            if not self._port.replay_channel_up:
                self._follow(seq, payload)
                return
            if nxt is None or seq == nxt:
                self._live_mark = max(self._live_mark, seq)
                self._submit(seq, payload)
                return
        self._hold(seq, payload)
        if self.pending is None:
            self._request_check("gap")

    def on_link_reset(self) -> None:
        """The live connection was re-established: the engine may have restarted.

        Live batches are held until a replay shows the stream unchanged (a new engine whose
        sequence happens to continue ours would otherwise be spliced on).
        """
        if self.pending is not None or self._port.replay_channel_up:
            self._check("reconnect", link=True)
        else:
            self.degraded = True  # followed blindly meanwhile: rebuild once replay works

    def on_replay_item(self, seq: int, payload: bytes) -> None:
        p = self.pending
        if p is None or seq < p.start:
            self.metrics.error("replay_protocol")
            return
        p.items += 1
        if p.restart or p.hole:
            return
        if seq <= p.check_to:  # a batch we submitted: the publisher's must be the same
            p.first = False
            if not self._is_copy(seq, payload):
                p.restart = True
                return
            p.last = seq
            self._judge_suspects_at(p, seq, payload)
            return
        if p.first:
            p.first = False
            if p.check_to >= 0:
                log.info("%s: the publisher no longer holds %d..%d", self.pod_key,
                         p.check_to + 1, seq - 1)  # fmt: skip
                self._begin_rebuild(seq, needed=p.check_to + 1, reason="range_lost")
            else:  # nothing submitted since the clear (or about to be cleared)
                self._begin_rebuild(seq, needed=0, reason=p.clear_first)
        self._replayed(p, seq, payload)

    def on_replay_end(self) -> None:
        p = self.pending
        if p is None:
            self.metrics.error("replay_protocol")
            return
        self.pending = None
        self._port.replay_answered()
        if p.restart or (p.check_to >= 0 and p.items == 0):
            log.info("%s: replay from %d shows a new stream: the publisher restarted",
                     self.pod_key, p.start)  # fmt: skip
            self._clear("restart")
            self._request(0, purpose="resync")
            return
        if p.first and p.check_to < 0:  # an empty answer to a rebuild: the publisher holds
            if p.clear_first:  # nothing (what arrived before is judged stale below)
                self._clear(p.clear_first)
            self.degraded = False
            self.next_seq = self._first = 0  # the stream starts at 0; nothing submitted
            self._set_partial(False)
        if p.hole:
            if not self.overflowed:
                self._request_check("gap")
            return
        self._judge(p)
        if self._waiting.has_suspects or self._doubt:  # doubts first: then trust what is held
            self._request_check("verify", verifies=True)
            return
        self._drain_held()
        if self.pending is not None or self.overflowed:
            return
        if self.degraded:
            self._request(0, purpose="recover", clear_first="recover")
        elif self._held:
            self._request_check("gap")

    def on_replay_failed(self) -> None:
        """The outstanding replay got no answer; the port has closed the replay channel."""
        p = self.pending
        self.pending = None
        if p is not None and p.restart:
            self._clear("restart")
        if self.next_seq is None:
            self.degraded = True  # the rebuild never began: retry it once replay works
        # What arrived was submitted in order, so the run still holds: the reconnect's
        # replay resumes from it. What waits is followed as it comes (nothing can be
        # checked now): a hole or a restart in it clears the pod (never trust a hole).
        for seq, live in self._waiting.empty():
            self._follow(seq, live.payload)

    def on_reconnected(self) -> None:
        """The replay channel is back: rebuild if degraded, else resume from the run."""
        if self.pending is None:
            self._idle_request("reconnect")

    def recover_overflow(self, queue_depth: int, capacity: int) -> bool:
        """After an overflow, once the queue is half empty, replay what was dropped."""
        if not self.overflowed or queue_depth > capacity // 2 or self.pending is not None:
            return False
        self.overflowed = False
        self._request_check("overflow")
        return True

    def probe(self) -> None:
        """Ask for anything after the last submitted batch (idle check)."""
        if self.pending is None and not self.overflowed:
            self._idle_request("probe")

    def resync(self, reason: str) -> None:
        """Drop the pod's entries; rebuild from a full replay, or follow live if none."""
        if self.pending is not None:  # its answer would continue the run being dropped
            self.pending = None
            self._port.restart_replay_channel()
        self._clear(reason)
        if self._port.replay_channel_up:
            self._request(0, purpose="resync")
        else:
            self.degraded = True

    # --- replay answers --------------------------------------------------------------

    def _begin_rebuild(self, first: int, *, needed: int, reason: str | None) -> None:
        """The answer starts at ``first``: apply it onto a cleared pod."""
        if first > needed:
            unseen = first - max(needed, self._live_mark + 1)
            if unseen > 0:
                self.metrics.missed_events.inc(unseen)
        for seq in [s for s in self._held if s < first]:
            # older than anything the publisher holds: cannot follow from it any more
            self.metrics.missed_events.inc(self._waiting.unhold(seq).gap)
            self.metrics.error("stale_batch")
        if reason is not None:
            self._clear(reason)
            self.degraded = False
        self.next_seq = None  # nothing submitted since the clear: the run begins here

    def _replayed(self, p: Replay, seq: int, payload: bytes) -> None:
        nxt = self.next_seq
        if nxt is not None and seq < nxt:
            if not self._is_copy(seq, payload):
                self.metrics.error("replay_protocol")  # the publisher repeats itself
            return
        while nxt is not None and nxt < seq and nxt in self._held and not self.overflowed:
            self._apply_held(nxt)  # the answer skips what arrived live: fill from it
            nxt = self.next_seq
        if self.overflowed or (nxt is not None and nxt < seq):
            p.hole = True
            return
        p.last = seq
        if seq in self._held:
            live = self._waiting.unhold(seq)
            if live.payload == payload:
                self.metrics.duplicates.inc()
                self.metrics.missed_events.inc(live.gap)
            elif live.epoch < p.number:
                self.metrics.error("stale_batch")  # not the publisher's batch of that seq
            else:  # arrived after the request: the next check decides
                live.gap = 0
                self._waiting.suspect(seq, live)
        if self._submit(seq, payload):
            self.metrics.replayed_batches.inc()
        else:
            p.hole = True

    def _judge_suspects_at(self, p: Replay, seq: int, payload: bytes) -> None:
        for live in self._waiting.take_suspects(seq, p.number):
            if live.payload == payload:
                self.metrics.duplicates.inc()
            else:
                self.metrics.error("stale_batch")  # not the publisher's batch of that seq

    def _judge(self, p: Replay) -> None:
        """Drop what arrived before ``p`` was sent and that its complete answer lacks."""
        last = p.last if p.last is not None else -1
        nxt = -1 if self.next_seq is None else self.next_seq
        for seq in [s for s, live in self._held.items()
                    if (live.epoch < p.number and s > last) or s < nxt]:  # fmt: skip
            self._waiting.unhold(seq)
            self.metrics.error("stale_batch")  # beyond what the publisher ever sent
        # (suspects that arrived after the request stay for the next check)
        for seq, live in self._waiting.take_all_suspects(p.number):
            if self._is_copy(seq, live.payload):
                self.metrics.duplicates.inc()
            else:  # the publisher's stream is what we hold, and this is not part of it
                self.metrics.error("stale_batch")

    # --- requests --------------------------------------------------------------------

    def _check(self, purpose: str, *, link: bool = False) -> None:
        """A check of the run, now, or after the outstanding answer if it is under way."""
        p = self.pending
        if p is not None and p.items == 0 and (link or not p.verifies):
            # nothing came back yet: it may have gone to a dying engine, which never answers
            self.pending = None
            self._port.restart_replay_channel()
        if self.pending is None:
            self._request_check(purpose, verifies=True)
        else:
            self._doubt = True

    def _idle_request(self, purpose: str) -> None:
        if self.degraded:
            self._request(0, purpose="recover", clear_first="recover")
        else:
            self._request_check(purpose)

    def _request_check(self, purpose: str, *, verifies: bool = False) -> None:
        """Ask for everything after the run's end, checking its last batch - or from the
        oldest suspect we can still compare; a rebuild from 0 if nothing was submitted."""
        nxt = self.next_seq
        if nxt is None or nxt == self._first:
            self._request(0, purpose=purpose, verifies=verifies)
            return
        lowest = max(self._first, nxt - self._window)
        start = min([nxt - 1, *(s for s in self._waiting.suspect_seqs() if s >= lowest)])
        self._request(start, check_to=nxt - 1, purpose=purpose, verifies=verifies)

    def _request(self, start: int, *, purpose: str, check_to: int = -1,
                 clear_first: str | None = None, verifies: bool = False) -> None:  # fmt: skip
        assert self.pending is None
        self._requests += 1
        self.pending = Replay(self._requests, start, check_to, purpose, clear_first, verifies)
        self._doubt = False  # every answer from now on judges what arrived before it
        self._port.send_replay_request(start)

    # --- live batches ------------------------------------------------------------------

    def _hold(self, seq: int, payload: bytes) -> None:
        old = self._held.get(seq)
        if old is not None and old.payload == payload:
            self.metrics.duplicates.inc()
        elif not self._room():
            pass
        elif old is not None:  # two batches, one seq: the replay will tell which one is real
            self._waiting.suspect(seq, Live(payload, self._requests))
        else:
            nxt = self.next_seq
            gap = 0 if nxt is None else max(0, seq - max(self._live_mark, nxt - 1) - 1)
            self._live_mark = max(self._live_mark, seq)
            self._waiting.hold(seq, Live(payload, self._requests, gap))

    def _follow(self, seq: int, payload: bytes) -> None:
        """No replay channel: follow the live stream as it comes."""
        nxt = self.next_seq
        if nxt is not None and seq < nxt and self._is_copy(seq, payload):
            self.metrics.duplicates.inc()
            return
        if nxt is not None and seq != nxt:
            if seq > nxt:
                self.metrics.missed_events.inc(max(0, seq - max(self._live_mark + 1, nxt)))
                self._clear("gap_unrecoverable")
            else:
                self._clear("restart")
            self.degraded = True
        if self.next_seq is None and seq > 0:
            self.degraded = True  # a run from the middle: rebuild it once replay works
        self._live_mark = max(self._live_mark, seq)
        self._submit(seq, payload)

    def _apply_held(self, seq: int) -> None:
        live = self._waiting.unhold(seq)
        if self._submit(seq, live.payload):
            self.metrics.missed_events.inc(live.gap)

    def _drain_held(self) -> None:
        while not self.overflowed and self.next_seq in self._held:
            self._apply_held(self.next_seq)

    def _room(self) -> bool:
        if self._waiting.has_room:
            return True
        self.metrics.queue_overflows.inc()  # dropped: a gap, recovered like any other
        return False

    # --- internals ---------------------------------------------------------------------

    def _is_copy(self, seq: int, payload: bytes) -> bool:
        nxt = self.next_seq
        return (nxt is not None and max(self._first, nxt - self._window) <= seq < nxt
                and self._copies[seq % self._window] == batch_digest(payload))  # fmt: skip

    def _submit(self, seq: int, payload: bytes) -> bool:
        if not self._port.submit(seq, payload):
            self.metrics.queue_overflows.inc()
            self.overflowed = True
            dropped = len(self._waiting.empty())
            if dropped:
                self.metrics.queue_overflows.inc(dropped)
            return False
        if self.next_seq is None:
            self._first = seq
            self._set_partial(seq > 0)
        self.next_seq = seq + 1
        self._copies[seq % self._window] = batch_digest(payload)
        return True

    def _clear(self, reason: str) -> None:
        self._port.clear()
        self.metrics.resync(reason)
        self.next_seq = None
        if reason == "restart":  # a new stream: gaps of the old one no longer count
            self._live_mark = -1
            for live in self._held.values():
                live.gap = 0

    def _set_partial(self, partial: bool) -> None:
        self.partial = partial
        self.metrics.partial_view.set(1 if partial else 0)
