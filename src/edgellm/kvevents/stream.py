"""One pod's stream of batches: which ones reach the index, in what order (pure logic).

No sockets, threads or clocks: :class:`PodStream` is fed live batches, replay answers and
replay failures by the pod's socket thread (``edgellm.kvevents.subscriber``) and acts
through a :class:`StreamPort` (send a batch to the index queue, clear the pod, send a
replay request, restart the replay channel).

Guarantees (spec 2 §4, beyond AIBrix):

- *order, exactly once*: batches are submitted in strictly increasing sequence order;
  replayed batches before the live ones that follow them; the live copy of a replayed
  batch (same seq, same bytes) is dropped.
- *gaps are filled*: a live seq beyond the next expected one triggers a replay of the
  missing range. Replays are *anchored*: they start at the last batch already submitted and
  the publisher must return it byte-identical, which proves it is the same stream.
- *holes are never trusted*: if the publisher no longer holds the range (first replayed seq
  beyond the anchor), or the anchor differs or is gone, or a live seq goes backwards and
  is not a replayed copy (engine restart), the pod is cleared and rebuilt from a full
  replay (from 0: whatever the publisher still holds). With the replay channel down the
  pod is cleared, the live stream followed, and the pod rebuilt once replay works again
  (*degraded*).
- *restart during a replay*: a restart seen while a replay is outstanding cancels it (the
  dead engine will never answer) instead of waiting for its timeout.
- *stale batches are not chased*: a live seq beyond a gap that the replay asked for it does
  not contain was never sent by this publisher; it is dropped (``stale_batch`` error).
- *bounded memory*: a submit refused because the pod's queue is full is counted
  (``queue_overflows``); live batches are then dropped until :meth:`PodStream.recover_overflow`
  finds the queue half empty and replays what was dropped (or resyncs if it is gone).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from edgellm.kvevents.metrics import PodMetrics

log = logging.getLogger(__name__)


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


@dataclass
class Replay:
    """The replay request outstanding."""

    start: int
    anchored: bool
    purpose: str  # start | resync | gap | overflow | probe | reconnect
    first: bool = True
    abandon: str | None = None  # a resync reason found while reading the answer
    hole: bool = False  # the answer skipped a seq (publisher HWM) or our queue was full
    items: int = 0
    want: int | None = None  # the live seq whose gap this replay fills


class PodStream:
    """The sequencing state of one pod's stream (see the module docstring)."""

    def __init__(self, pod_key: str, port: StreamPort, metrics: PodMetrics, *,
                 hold_capacity: int = 100_000):  # fmt: skip
        self.pod_key = pod_key
        self._port = port
        self.metrics = metrics
        self.hold_capacity = hold_capacity
        self.next_seq: int | None = None  # next seq to submit; None: take what comes first
        self._anchor: bytes | None = None  # payload of next_seq-1, if submitted since the clear
        self._replayed: dict[int, bytes] = {}  # replayed batches whose live copy may follow
        self.pending: Replay | None = None
        self._held: deque[tuple[int, bytes]] = deque()  # live batches waiting for a replay
        self.degraded = False
        self.overflowed = False
        self._unknown_seq: int | None = None

    @property
    def busy(self) -> bool:
        """A replay is outstanding, live batches are held, or the queue overflowed."""
        return self.pending is not None or bool(self._held) or self.overflowed

    # --- inputs ------------------------------------------------------------------------

    def start(self) -> None:
        """A new subscription: the pod's entries may be stale; clear, then replay all."""
        self._port.clear()
        self._request(0, anchored=False, purpose="start")

    def on_live(self, seq: int, payload: bytes) -> None:
        if self.pending is not None:
            nxt = self.next_seq
            if nxt is not None and seq < nxt and self._replayed.get(seq) != payload:
                log.info("%s: sequence went back to %d during a replay: publisher restarted",
                         self.pod_key, seq)  # fmt: skip
                self.pending = None
                self._held.clear()  # batches of the dead process
                self._port.restart_replay_channel()
                self.resync("restart", first_live=(seq, payload))
            elif len(self._held) < self.hold_capacity:
                self._held.append((seq, payload))
            else:
                self.metrics.queue_overflows.inc()  # a gap, recovered like any other
            return
        if self.overflowed:
            self.metrics.queue_overflows.inc()
            return
        self._accept_live(seq, payload)

    def on_replay_item(self, seq: int, payload: bytes) -> None:
        p = self.pending
        if p is None:
            self.metrics.error("replay_protocol")
            return
        p.items += 1
        if p.abandon or p.hole:
            return
        if p.first:
            p.first = False
            if p.anchored:
                if seq == p.start and payload == self._anchor:
                    return  # the same stream: continue after the anchor
                p.abandon = "restart" if seq <= p.start else "range_lost"
                if seq > p.start:
                    self.metrics.missed_events.inc(seq - p.start - 1)
                return
            if self.next_seq is not None and seq > self.next_seq:
                # Nothing of this stream is held since the last clear: start where it starts.
                self.metrics.missed_events.inc(seq - self.next_seq)
                self.next_seq = None
        nxt = self.next_seq
        if nxt is None or seq == nxt:
            if self._submit(seq, payload):
                self._replayed[seq] = payload
                self.metrics.replayed_batches.inc()
            else:
                p.hole = True
        elif seq > nxt:
            p.hole = True  # the answer skipped batches: ask again from where we are
        # seq < nxt: already submitted (not from a well-behaved publisher): ignore

    def on_replay_end(self) -> None:
        p = self.pending
        if p is None:
            self.metrics.error("replay_protocol")
            return
        self.pending = None
        self._port.replay_answered()
        self._unknown_seq = None
        if p.want is not None and not (p.abandon or p.hole):
            if self.next_seq is not None and p.want > self.next_seq:
                self._unknown_seq = p.want
        if p.abandon:
            log.info("%s: replay from %d found %s; resyncing", self.pod_key, p.start, p.abandon)
            self.resync(p.abandon)
        elif p.items == 0 and p.anchored:
            self.resync("restart")  # nothing at or after our anchor: the engine restarted
        elif p.items == 0 and p.start == 0 and self.next_seq is None:
            self.next_seq = 0  # nothing published yet: the stream must start at 0
        elif p.hole and not self.overflowed:
            self._request_gap("gap")
        if self.degraded and self.pending is None and self._port.replay_channel_up:
            self.degraded = False
            self.resync("recover")
        self._drain_held()

    def on_replay_failed(self) -> None:
        """The outstanding replay got no answer; the port has closed the replay channel."""
        p = self.pending
        self.pending = None
        # What arrived was submitted in order, so the anchor still holds: the reconnect's
        # anchored replay resumes from it. Live batches held meanwhile go now; one beyond a
        # hole finds no replay channel and clears the pod (never trust a hole).
        if p is not None and p.abandon and self.next_seq is not None:
            self._clear(p.abandon)
            self.degraded = True
        self._drain_held()

    def on_reconnected(self) -> None:
        """The replay channel is back: rebuild if degraded, else resume from the anchor."""
        if self.pending is not None:
            return
        if self.degraded:
            self.degraded = False
            self.resync("recover")
        else:
            self._request_gap("reconnect")

    def recover_overflow(self, queue_depth: int, capacity: int) -> bool:
        """After an overflow, once the queue is half empty, replay what was dropped."""
        if not self.overflowed or queue_depth > capacity // 2 or self.pending is not None:
            return False
        self.overflowed = False
        self._request_gap("overflow")
        return True

    def probe(self) -> None:
        """Ask for anything after the last submitted batch (idle check)."""
        if self.pending is None:
            self._request_gap("probe")

    def resync(self, reason: str, first_live: tuple[int, bytes] | None = None) -> None:
        """Drop the pod's entries; rebuild from a full replay, or follow live if none."""
        self._clear(reason)
        if self._port.replay_channel_up and self.pending is None:
            if first_live is not None:
                self._held.appendleft(first_live)
            self._request(0, anchored=False, purpose="resync")
        else:
            self.degraded = True
            if first_live is not None:
                self._submit(*first_live)

    # --- internals ---------------------------------------------------------------------

    def _accept_live(self, seq: int, payload: bytes) -> None:
        nxt = self.next_seq
        if nxt is None or seq == nxt:
            self._replayed.clear()  # live has passed every replayed batch
            self._submit(seq, payload)
            return
        if seq > nxt:
            self._replayed.clear()
            if seq == self._unknown_seq:
                # The replay asked for after this very batch did not contain it: the
                # publisher never sent it (a leftover of an earlier incarnation). Skip it.
                self._unknown_seq = None
                self.metrics.error("stale_batch")
                return
            if self._port.replay_channel_up:
                self._held.appendleft((seq, payload))
                self._request_gap("gap")
                assert self.pending is not None
                self.pending.want = seq
                return
            self.metrics.missed_events.inc(seq - nxt)
            self._clear("gap_unrecoverable")
            self.degraded = True
            self._submit(seq, payload)
            return
        copy = self._replayed.pop(seq, None)
        if copy is not None and copy == payload:
            self.metrics.duplicates.inc()
            return
        log.info("%s: sequence went back from %d to %d: publisher restarted", self.pod_key,
                 nxt - 1, seq)  # fmt: skip
        self.resync("restart", first_live=(seq, payload))

    def _submit(self, seq: int, payload: bytes) -> bool:
        if not self._port.submit(seq, payload):
            self.metrics.queue_overflows.inc()
            self.overflowed = True
            return False
        self.next_seq = seq + 1
        self._anchor = payload
        return True

    def _clear(self, reason: str) -> None:
        self._port.clear()
        self.metrics.resync(reason)
        self._anchor = None
        self._replayed.clear()
        self.next_seq = None

    def _request_gap(self, purpose: str) -> None:
        """Ask for everything after the last submitted batch, anchored on it if possible."""
        if self.next_seq is None:
            self._request(0, anchored=False, purpose=purpose)
        elif self._anchor is not None:
            self._request(self.next_seq - 1, anchored=True, purpose=purpose)
        else:
            self._request(self.next_seq, anchored=False, purpose=purpose)

    def _request(self, start: int, *, anchored: bool, purpose: str) -> None:
        assert self.pending is None
        self.pending = Replay(start, anchored, purpose)
        self._port.send_replay_request(start)

    def _drain_held(self) -> None:
        while self._held and self.pending is None and not self.overflowed:
            self._accept_live(*self._held.popleft())
        if self.overflowed and self._held:
            self.metrics.queue_overflows.inc(len(self._held))
            self._held.clear()
