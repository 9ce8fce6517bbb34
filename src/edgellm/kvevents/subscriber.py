"""One pod's KV event client: SUB for the live stream, DEALER for replay, on one thread.

The thread owns both sockets and decides, per pod, which batches reach the index and in
what order; it never decodes or touches the index. Batches go, as raw payloads, into the
manager's apply queue (:class:`BatchSink`), which applies them in order on its own thread.

Guarantees (spec 2 §4, beyond AIBrix):

- *order, exactly once*: batches reach the sink in strictly increasing sequence order;
  replayed batches are applied before the live ones that follow them; the live copy of a
  replayed batch (same seq, same bytes) is dropped.
- *gaps are filled*: a live seq beyond the next expected one triggers a replay of the
  missing range. Replays are *anchored*: they start at the last batch already sent to the
  index and the publisher must return it byte-identical, which proves the stream is the
  same one.
- *holes are never trusted*: when the publisher no longer holds the range (first replayed
  seq beyond the anchor), or the anchor differs or is missing, or a live seq goes
  backwards and is not a replayed copy (engine restart), the pod's entries are cleared
  and rebuilt from a full replay (from 0: whatever the publisher still holds). If the
  replay channel is down, the client clears the pod, follows the live stream and rebuilds
  once replay works again.
- *bounded memory*: at most ``queue_capacity`` batches of the pod wait in the sink; beyond
  that live batches are dropped (``queue_overflows``) and fetched again by replay once the
  queue is half empty (or the pod is resynced if they are gone).
- *idle probe*: after ``idle_probe_interval`` without live traffic an anchored replay asks
  for anything newer: a lost final batch, or an engine that restarted and stayed idle.
- *reconnect*: a replay unanswered within ``replay_timeout`` marks the client disconnected;
  the DEALER is recreated after ``reconnect_delay`` (x2 per failure, up to 30 s) and an
  anchored replay resumes from the last applied batch. The SUB reconnects by itself.

Start sends a clear of the pod, then a full replay from 0 (the index may hold entries of
an earlier subscription). ``stop()`` is idempotent and joins the thread; the pod's metric
series are removed by the manager after the client stopped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import zmq

from edgellm.discovery.pod import Pod
from edgellm.kvevents.config import SubscriberConfig
from edgellm.kvevents.metrics import PodMetrics

log = logging.getLogger(__name__)

_END_SEQ = -1
_LIVE_DRAIN = 1000  # live messages read per wake-up before looking at the other socket


class BatchSink(Protocol):
    """Where a client sends work for the index (the manager's apply queue)."""

    def submit_batch(self, sub: "PodSubscriber", seq: int, payload: bytes, replayed: bool) -> None:
        """Apply this batch after everything submitted before it."""

    def submit_clear(self, sub: "PodSubscriber") -> None:
        """Drop the pod's entries (after everything submitted before it)."""


@dataclass
class _Replay:
    start: int
    anchored: bool
    purpose: str  # start | resync | gap | overflow | probe | reconnect
    deadline: float
    first: bool = True
    abandon: str | None = None  # a resync reason found while answering: redo from 0
    hole: bool = False  # the answer skipped a seq (publisher HWM, our queue full)
    items: int = 0
    want: int | None = None  # the live seq whose gap this replay fills


class PodSubscriber:
    """The client of one pod (see the module docstring). Started by the manager."""

    def __init__(
        self,
        pod: Pod,
        sink: BatchSink,
        metrics: PodMetrics,
        config: SubscriberConfig | None = None,
        *,
        ctx: zmq.Context | None = None,
    ):
        self.pod = pod
        self.pod_key = pod.pod_key
        self.context_model = pod.model
        self.config = config or SubscriberConfig()
        self.metrics = metrics
        self._sink = sink
        self._ctx = ctx if ctx is not None else zmq.Context.instance()
        # Written by the apply thread only:
        self.applied_seq: int | None = None
        self.dequeued = 0
        self.resync_requested = False
        # Written by the socket thread only:
        self.enqueued = 0
        self.connected = False
        self.closed = False
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(
            target=self._run, name=f"kv-sub-{pod.pod_key}", daemon=True
        )
        self._state = "new"
        self._lock = threading.Lock()
        self._idle = threading.Event()

    # --- lifecycle (any thread) ------------------------------------------------------

    def start(self) -> "PodSubscriber":
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"subscriber already {self._state}")
            self._state = "running"
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and close the sockets; batches still queued are skipped."""
        with self._lock:
            if self._state == "stopped":
                return
            was_running = self._state == "running"
            self._state = "stopped"
            self.closed = True
        if was_running:
            os.write(self._stop_w, b"\x01")
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("subscriber thread of %s did not stop in %.1fs", self.pod_key, timeout)
                return  # leave the pipe open: the thread still polls it
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)

    def __enter__(self) -> "PodSubscriber":
        if self._state == "new":
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def queue_depth(self) -> int:
        return self.enqueued - self.dequeued

    def request_resync(self) -> None:
        """Ask for the pod's entries to be dropped and rebuilt (called by the apply thread)."""
        self.resync_requested = True

    @property
    def quiescent(self) -> bool:
        """No replay outstanding, nothing held, nothing queued (for tests and benches)."""
        return self._idle.is_set() and self.queue_depth == 0

    # --- the socket thread -----------------------------------------------------------

    def _run(self) -> None:
        cfg = self.config
        self._sub: zmq.Socket | None = None
        self._dealer: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._poller.register(self._stop_r, zmq.POLLIN)
        # Stream state.
        self._next_seq: int | None = None
        self._anchor: bytes | None = None  # payload of batch next_seq-1, if sent since the clear
        self._replayed: dict[int, bytes] = {}
        self._pending: _Replay | None = None
        self._held: deque[tuple[int, bytes]] = deque()
        self._degraded = False
        self._overflowed = False
        self._unknown_seq: int | None = None
        self._delay = cfg.reconnect_delay
        self._reconnect_at: float | None = None
        now = time.monotonic()
        self._last_live = now
        self._last_replay = now
        self._last_index_resync = 0.0
        self._failed_at: float | None = None
        try:
            self._open_sub()
            self._open_dealer()
            self._sink.submit_clear(self)
            self._request_replay(0, anchored=False, purpose="start")
            while self._loop_once():
                pass
        except Exception:
            log.exception("KV event client of %s failed", self.pod_key)
            self.metrics.error("socket")
        finally:
            for sock in (self._sub, self._dealer):
                if sock is not None:
                    sock.close(linger=0)
            self._set_connected(False, count=False)

    def _open_sub(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.ipv6 = self.config.ipv6
        sub.rcvhwm = self.config.rcvhwm
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.pod.pub_endpoint)
        self._sub = sub
        self._poller.register(sub, zmq.POLLIN)

    def _open_dealer(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.ipv6 = self.config.ipv6
        dealer.rcvhwm = 0  # a full replay must not be cut on our side
        dealer.connect(self.pod.router_endpoint)
        self._dealer = dealer
        self._poller.register(dealer, zmq.POLLIN)

    def _close_dealer(self) -> None:
        if self._dealer is not None:
            self._poller.unregister(self._dealer)
            self._dealer.close(linger=0)  # drops late answers to a timed-out request
            self._dealer = None

    def _loop_once(self) -> bool:
        ready = dict(self._poller.poll(self._poll_ms()))
        if self._stop_r in ready:
            return False
        if self._sub in ready:
            self._read_live()
        if self._dealer is not None and self._dealer in ready:
            self._read_replay()
        self._timers(time.monotonic())
        busy = self._pending is not None or bool(self._held) or self._overflowed
        if busy:
            self._idle.clear()
        else:
            self._idle.set()
        return True

    def _poll_ms(self) -> int:
        return max(1, int(self.config.poll_timeout * 1000))

    # --- live stream -----------------------------------------------------------------

    def _read_live(self) -> None:
        sub = self._sub
        assert sub is not None
        for _ in range(_LIVE_DRAIN):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 3:
                seq_bytes, payload = frames[1], frames[2]
            elif len(frames) == 2:
                seq_bytes, payload = frames
            else:
                self.metrics.error("protocol")
                continue
            if len(seq_bytes) != 8:
                self.metrics.error("protocol")
                continue
            self._on_live(int.from_bytes(seq_bytes, "big", signed=True), payload)

    def _on_live(self, seq: int, payload: bytes) -> None:
        now = time.monotonic()
        if not self.connected and self._dealer is None and self._reconnect_at is not None:
            # Live traffic after a silence longer than a replay timeout: the publisher is
            # probably back (restarted); try the replay channel now instead of backing off.
            if now - self._last_live > self.config.replay_timeout:
                self._reconnect_at = now
        self._last_live = now
        if seq < 0:
            self.metrics.error("protocol")
            return
        if self._pending is not None:
            nxt = self._next_seq
            if nxt is not None and seq < nxt and self._replayed.get(seq) != payload:
                # The engine restarted while we wait for a replay, which may never come
                # (asked of the dead process): drop it and the stale batches held so far.
                log.info("%s: sequence went back to %d during a replay: publisher restarted",
                         self.pod_key, seq)  # fmt: skip
                self._pending = None
                self._held.clear()
                self._close_dealer()
                self.metrics.reconnect_attempts.inc()
                self._open_dealer()
                self._resync("restart", first_live=(seq, payload))
                return
            if len(self._held) < self.config.hold_capacity:
                self._held.append((seq, payload))
            else:
                self.metrics.queue_overflows.inc()
            return
        if self._overflowed:
            self.metrics.queue_overflows.inc()
            return
        self._accept_live(seq, payload)

    def _accept_live(self, seq: int, payload: bytes) -> None:
        nxt = self._next_seq
        if nxt is None or seq == nxt:
            self._replayed.clear()
            self._enqueue(seq, payload, replayed=False)
            return
        if seq > nxt:
            self._replayed.clear()
            if seq == self._unknown_seq:
                # A replay asked for after this very batch did not contain it: the publisher
                # never sent it (a leftover of an earlier incarnation). Skip it.
                self._unknown_seq = None
                self.metrics.error("stale_batch")
                return
            if self._dealer is not None:
                self._held.appendleft((seq, payload))
                self._request_gap_replay("gap")
                assert self._pending is not None
                self._pending.want = seq
                return
            # No replay channel: the range is lost; never trust a hole.
            self.metrics.missed_events.inc(seq - nxt)
            self._clear("gap_unrecoverable")
            self._degraded = True
            self._enqueue(seq, payload, replayed=False)
            return
        copy = self._replayed.pop(seq, None)
        if copy is not None and copy == payload:
            self.metrics.duplicates.inc()
            return
        # The sequence went backwards and this is not a replayed copy: engine restart.
        log.info("%s: sequence went back from %d to %d: publisher restarted", self.pod_key, nxt - 1, seq)
        self._resync("restart", first_live=(seq, payload))

    # --- sending to the index --------------------------------------------------------

    def _enqueue(self, seq: int, payload: bytes, replayed: bool) -> bool:
        if self.queue_depth >= self.config.queue_capacity:
            self.metrics.queue_overflows.inc()
            self._overflowed = True
            return False
        self.enqueued += 1
        self._sink.submit_batch(self, seq, payload, replayed)
        self._next_seq = seq + 1
        self._anchor = payload
        return True

    def _clear(self, reason: str) -> None:
        self._sink.submit_clear(self)
        self.metrics.resync(reason)
        self._anchor = None
        self._replayed.clear()
        self._next_seq = None

    def _resync(self, reason: str, first_live: tuple[int, bytes] | None = None) -> None:
        """Drop the pod's entries; rebuild from a full replay, or follow live if none."""
        self._clear(reason)
        if self._dealer is not None and self._pending is None:
            if first_live is not None:
                self._held.appendleft(first_live)
            self._request_replay(0, anchored=False, purpose="resync")
        else:
            self._degraded = True
            if first_live is not None:
                self._enqueue(*first_live, replayed=False)

    # --- replay ----------------------------------------------------------------------

    def _request_gap_replay(self, purpose: str) -> None:
        """Ask for everything after the last batch sent to the index."""
        if self._next_seq is None:
            self._request_replay(0, anchored=False, purpose=purpose)
        elif self._anchor is not None:
            self._request_replay(self._next_seq - 1, anchored=True, purpose=purpose)
        else:
            self._request_replay(self._next_seq, anchored=False, purpose=purpose)

    def _request_replay(self, start: int, *, anchored: bool, purpose: str) -> None:
        assert self._dealer is not None and self._pending is None
        now = time.monotonic()
        self._pending = _Replay(start, anchored, purpose, now + self.config.replay_timeout)
        try:
            self._dealer.send_multipart([b"", start.to_bytes(8, "big")], zmq.NOBLOCK)
        except zmq.Again:
            self._pending.deadline = now  # cannot even queue the request: fails at once
        self._last_replay = now
        self.metrics.replay_requests.inc()

    def _read_replay(self) -> None:
        dealer = self._dealer
        while dealer is not None and dealer is self._dealer:
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            body = frames[1:] if frames and frames[0] == b"" else frames
            if len(body) == 3:  # newer vLLM adds the topic
                body = body[1:]
            if len(body) != 2 or len(body[0]) != 8 or self._pending is None:
                self.metrics.error("replay_protocol")
                continue
            seq = int.from_bytes(body[0], "big", signed=True)
            if seq == _END_SEQ:
                self._complete_replay()
            elif seq >= 0:
                self._on_replay_item(seq, body[1])
            else:
                self.metrics.error("replay_protocol")

    def _on_replay_item(self, seq: int, payload: bytes) -> None:
        p = self._pending
        assert p is not None
        p.items += 1
        if p.abandon or p.hole:
            return
        if p.first:
            p.first = False
            if p.anchored:
                if seq == p.start and payload == self._anchor:
                    return  # same stream: continue after the anchor
                p.abandon = "restart" if seq <= p.start else "range_lost"
                if seq > p.start:
                    self.metrics.missed_events.inc(seq - p.start - 1)
                return
            if self._next_seq is not None and seq > self._next_seq:
                # Nothing of this stream is held since the last clear: start where it starts.
                self.metrics.missed_events.inc(seq - self._next_seq)
                self._next_seq = None
        nxt = self._next_seq
        if nxt is None or seq == nxt:
            if self._enqueue(seq, payload, replayed=True):
                self._replayed[seq] = payload
                self.metrics.replayed_batches.inc()
            else:
                p.hole = True
        elif seq > nxt:
            p.hole = True  # the answer skipped batches: ask again from where we are
        # seq < nxt: already sent (cannot come from a well-behaved publisher); ignore

    def _complete_replay(self) -> None:
        p = self._pending
        assert p is not None
        self._pending = None
        self._set_connected(True)
        self._delay = self.config.reconnect_delay
        self._unknown_seq = None
        if p.want is not None and not (p.abandon or p.hole):
            nxt = self._next_seq
            if nxt is not None and p.want > nxt:
                self._unknown_seq = p.want
        if p.abandon:
            log.info("%s: replay from %d found %s; resyncing", self.pod_key, p.start, p.abandon)
            self._resync(p.abandon)
        elif p.items == 0 and p.anchored:
            # The publisher holds nothing at or after our anchor: it restarted.
            self._resync("restart")
        elif p.items == 0 and p.start == 0 and self._next_seq is None:
            self._next_seq = 0  # nothing published yet: the stream must start at 0
        elif p.hole and not self._overflowed:
            self._request_gap_replay("gap")
        if self._degraded and self._pending is None and self._dealer is not None:
            self._degraded = False
            self._resync("recover")
        self._drain_held()

    def _drain_held(self) -> None:
        while self._held and self._pending is None and not self._overflowed:
            self._accept_live(*self._held.popleft())
        if self._overflowed and self._held:
            self.metrics.queue_overflows.inc(len(self._held))
            self._held.clear()

    def _replay_failed(self, now: float) -> None:
        p = self._pending
        assert p is not None
        self._pending = None
        self.metrics.error("replay_timeout")
        log.warning("%s: no replay answer from %s in %.1fs", self.pod_key, self.pod.router_endpoint,
                    self.config.replay_timeout)  # fmt: skip
        self._close_dealer()
        self._set_connected(False)
        self._reconnect_at = now + self._delay
        self._delay = min(self._delay * self.config.reconnect_backoff, self.config.max_reconnect_delay)
        # What arrived was applied in order, so the anchor still holds: the reconnect's
        # anchored replay resumes from it. Live batches held meanwhile are applied now; one
        # beyond a hole finds no replay channel and clears the pod (never trust a hole).
        if p.abandon and self._next_seq is not None:
            self._clear(p.abandon)
            self._degraded = True
        self._drain_held()

    def _set_connected(self, up: bool, count: bool = True) -> None:
        if up == self.connected:
            return
        self.connected = up
        self.metrics.connection_status.set(1 if up else 0)
        if count:
            (self.metrics.connections if up else self.metrics.disconnections).inc()

    # --- timers ----------------------------------------------------------------------

    def _timers(self, now: float) -> None:
        cfg = self.config
        p = self._pending
        if p is not None and now >= p.deadline:
            self._replay_failed(now)
        if self._dealer is None and self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect_at = None
            self.metrics.reconnect_attempts.inc()
            self._open_dealer()
            if self._degraded:
                self._degraded = False
                self._resync("recover")
            else:
                self._request_gap_replay("reconnect")
            return
        if self._pending is not None or self._dealer is None:
            return
        if self._overflowed and self.queue_depth <= cfg.queue_capacity // 2:
            self._overflowed = False
            self._request_gap_replay("overflow")
        elif self.resync_requested and now - self._last_index_resync >= cfg.replay_timeout:
            self.resync_requested = False
            self._last_index_resync = now
            self._resync("index_error")
        elif (
            cfg.idle_probe_interval > 0
            and now - max(self._last_live, self._last_replay) >= cfg.idle_probe_interval
        ):
            self._request_gap_replay("probe")
