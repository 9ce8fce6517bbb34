"""One pod's KV event client: SUB for the live stream, DEALER for replay, on one thread.

The thread owns both sockets and the pod's timers; what reaches the index and in what
order is decided by the pod's :class:`~edgellm.kvevents.stream.PodStream` (read its
docstring for the guarantees: exactly-once ordered application, anchored gap replays,
resync on restart or lost ranges, bounded queue). The thread never decodes or touches the
index: batches go, as raw payloads, into the pod's :class:`~edgellm.kvevents.feed.PodFeed`
to the apply thread.

The path of a KV batch, top to bottom::

    engine PUB --tcp--> Sub (this socket thread) -> PodStream (order, gaps, replays)
      -> PodFeed.submit -> the apply thread (EventApplier) -> BatchDecoder -> PrefixIndex

Socket behaviour (AIBrix ``ZMQClient`` defaults in :class:`SubscriberConfig`): SUB
connects to ``tcp://<ip>:<pub_port>`` (IPv6 enabled, every topic), DEALER to
``<router_port>``; start = clear the pod, replay from 0, consume. A replay unanswered
within ``replay_timeout`` (5 s) closes the DEALER (late answers can never be mistaken for
a new request's); it is recreated after ``reconnect_delay`` (1 s, x2 per failure up to
30 s) - at once if live traffic resumes after a silence longer than the replay timeout
(the engine is back) - and the stream resumes from its anchor.

The SUB reconnects by itself; its socket monitor drives the connection metrics
(connected: ``connections_total`` +1 and status 1; disconnected: ``disconnections_total``
+1 and status 0; each connect retry: ``reconnect_attempts_total`` +1, as is each DEALER
re-creation). Each time its TCP connection is re-established the stream holds live
batches until an anchored replay shows the engine did not restart
(:meth:`PodStream.on_link_reset`), and is probed again shortly after (batches published
before the subscription took effect); and again after ``idle_probe_interval`` without
live traffic (a lost final batch, a restarted idle engine).

``stop()`` is idempotent and joins the thread; the manager removes the pod's metric series
after the client stopped.
"""

from __future__ import annotations

import logging
import threading
import time

from edgellm.comm.endpoints import Dealer, LinkEvent, Sub
from edgellm.comm.loop import SocketThread
from edgellm.discovery.pod import Pod
from edgellm.kvevents.config import SubscriberConfig
from edgellm.kvevents.feed import BatchSink, PodFeed
from edgellm.kvevents.metrics import PodMetrics
from edgellm.kvevents.stream import PodStream

log = logging.getLogger(__name__)

_END_SEQ = -1
_LIVE_DRAIN = 1000  # live messages read per wake-up before looking at the other socket
_SETTLE_AFTER_CONNECT = 0.2  # s from the SUB's TCP connection to its subscription in effect


class PodSubscriber(SocketThread):
    """The client of one pod (see the module docstring). Started by the manager."""

    def __init__(self, pod: Pod, sink: BatchSink, metrics: PodMetrics,
                 config: SubscriberConfig | None = None):  # fmt: skip
        self.config = config or SubscriberConfig()
        super().__init__(f"kv-sub-{pod.pod_key}", tick=max(0.001, self.config.poll_timeout))
        self.pod = pod
        self.pod_key = pod.pod_key
        self.metrics = metrics
        self.feed = PodFeed(pod, metrics, sink, self.config.queue_capacity)
        self.connected = False  # written by the socket thread only
        self._idle = threading.Event()
        self._sub: Sub | None = None
        self._dealer: Dealer | None = None
        self._resume: tuple[int, int] | None = None

    # --- lifecycle (any thread) ------------------------------------------------------

    def resume_from(self, seq: int, digest: int) -> "PodSubscriber":
        """Before :meth:`start`: continue after batch ``seq`` (applied by another writer of
        a shared index) instead of clearing and replaying all (``PodStream.resume``)."""
        self._resume = (seq, digest)
        return self

    def start(self, timeout: float = 10.0) -> "PodSubscriber":
        return super().start(timeout)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the thread and close the sockets; batches still queued are skipped."""
        self.feed.close()
        if not super().stop(timeout):
            log.error("subscriber thread of %s did not stop in %.1fs", self.pod_key, timeout)
            return False
        return True

    @property
    def queue_depth(self) -> int:
        return self.feed.queue_depth

    @property
    def applied_seq(self) -> int | None:
        """Sequence number of the last batch applied to the index."""
        return self.feed.applied_seq

    @property
    def quiescent(self) -> bool:
        """No replay outstanding, nothing held, nothing queued (for tests and benches)."""
        return self._idle.is_set() and self.feed.queue_depth == 0

    # --- StreamPort (called on the socket thread by the stream) ------------------------

    @property
    def replay_channel_up(self) -> bool:
        return self._dealer is not None

    def submit(self, seq: int, payload: bytes) -> bool:
        return self.feed.submit(seq, payload)

    def clear(self) -> None:
        self.feed.clear()

    def send_replay_request(self, start: int) -> None:
        assert self._dealer is not None
        now = time.monotonic()
        self._replay_deadline = now + self.config.replay_timeout
        self._last_replay = now
        self.metrics.replay_requests.inc()
        if not self._dealer.send_multipart([b"", start.to_bytes(8, "big")]):
            self._replay_deadline = now  # cannot even queue the request: fails at once

    def restart_replay_channel(self) -> None:
        self._close_dealer()
        self.metrics.reconnect_attempts.inc()
        self._open_dealer()

    def replay_answered(self) -> None:
        self._delay = self.config.reconnect_delay

    # --- the socket thread -----------------------------------------------------------

    def setup(self) -> None:
        self._stream = PodStream(self.pod_key, self, self.metrics,
                                 hold_capacity=self.config.hold_capacity)  # fmt: skip
        self._delay = self.config.reconnect_delay
        self._reconnect_at: float | None = None
        self._replay_deadline = 0.0
        now = time.monotonic()
        self._last_live = now
        self._last_replay = now
        self._last_index_resync = 0.0
        self._probe_at: float | None = None
        self._was_connected = False
        self._open_sub()
        self._open_dealer()
        if self._resume is not None:
            self._stream.resume(*self._resume)
        else:
            self._stream.start()

    def teardown(self) -> None:
        self._set_connected(False, count=False)

    def on_error(self, where: str, exc: BaseException) -> None:
        self.metrics.error("socket")

    def _open_sub(self) -> None:
        cfg = self.config
        # Connection events of the SUB drive the connection metrics; a reconnection may
        # follow a publisher restart and leaves a window before the subscription takes
        # effect: verify the stream, and probe once the subscription is in effect.
        events = LinkEvent.CONNECTED | LinkEvent.DISCONNECTED | LinkEvent.CONNECT_RETRIED
        sub = self._sub = self.open(Sub, self.pod.pub_endpoint, ipv6=cfg.ipv6,
                                    rcvhwm=cfg.rcvhwm, monitor=events, curve=cfg.curve)  # fmt: skip
        # Monitor first: a new connection's batches follow its event.
        self.add_reader(sub.link_monitor, self._read_monitor)  # type: ignore[arg-type]
        self.add_reader(sub, self._read_live)

    def _open_dealer(self) -> None:
        # rcvhwm 0: a full replay must not be cut on our side.
        self._dealer = self.open(Dealer, self.pod.router_endpoint, ipv6=self.config.ipv6,
                                 rcvhwm=0, curve=self.config.curve)  # fmt: skip
        self.add_reader(self._dealer, self._read_replay)

    def _close_dealer(self) -> None:
        if self._dealer is not None:
            self.close_endpoint(self._dealer)  # drops late answers to a timed-out request
            self._dealer = None

    def on_tick(self) -> None:
        self._check_timers(time.monotonic())
        if self._stream.busy:
            self._idle.clear()
        else:
            self._idle.set()

    def _read_live(self) -> None:
        for frames in self._sub.drain_multipart(_LIVE_DRAIN):  # type: ignore[union-attr]
            if len(frames) == 3:
                seq_bytes, payload = frames[1], frames[2]
            elif len(frames) == 2:
                seq_bytes, payload = frames
            else:
                self.metrics.error("protocol")
                continue
            seq = int.from_bytes(seq_bytes, "big", signed=True) if len(seq_bytes) == 8 else -1
            if seq < 0:
                self.metrics.error("protocol")
                continue
            now = time.monotonic()
            if self._dealer is None and now - self._last_live > self.config.replay_timeout:
                # Live traffic after a long silence: the engine is probably back (restarted);
                # retry the replay channel now rather than after the backoff.
                self._reconnect_at = now
            self._last_live = now
            self._stream.on_live(seq, payload)

    def _read_monitor(self) -> None:
        for event in self._sub.link_monitor.events():  # type: ignore[union-attr]
            if event == LinkEvent.CONNECTED:
                self._set_connected(True)
                if self._was_connected:
                    self._stream.on_link_reset()
                self._was_connected = True
                self._probe_at = time.monotonic() + _SETTLE_AFTER_CONNECT
            elif event == LinkEvent.DISCONNECTED:
                self._set_connected(False)
            elif event == LinkEvent.CONNECT_RETRIED:
                self.metrics.reconnect_attempts.inc()

    def _read_replay(self) -> None:
        dealer = self._dealer
        while dealer is not None and dealer is self._dealer:
            batch = dealer.drain_multipart(64)
            if not batch:
                return
            for frames in batch:
                if dealer is not self._dealer:
                    return  # the replay channel was restarted: late answers are dropped
                self._replay_frames(frames)

    def _replay_frames(self, frames: list[bytes]) -> None:
        body = frames[1:] if frames and frames[0] == b"" else frames
        if len(body) == 3:  # newer vLLM adds the topic
            body = body[1:]
        if len(body) != 2 or len(body[0]) != 8:
            self.metrics.error("replay_protocol")
            return
        seq = int.from_bytes(body[0], "big", signed=True)
        if seq == _END_SEQ:
            self._stream.on_replay_end()
        elif seq >= 0:
            self._stream.on_replay_item(seq, body[1])
        else:
            self.metrics.error("replay_protocol")
    def _set_connected(self, up: bool, count: bool = True) -> None:
        if up == self.connected:
            return
        self.connected = up
        self.metrics.connection_status.set(1 if up else 0)
        if count:
            (self.metrics.connections if up else self.metrics.disconnections).inc()

    def _check_timers(self, now: float) -> None:
        cfg = self.config
        stream = self._stream
        if stream.pending is not None and now >= self._replay_deadline:
            self.metrics.error("replay_timeout")
            log.warning("%s: no replay answer from %s in %.1fs", self.pod_key,
                        self.pod.router_endpoint, cfg.replay_timeout)  # fmt: skip
            self._close_dealer()
            self._reconnect_at = now + self._delay
            self._delay = min(self._delay * cfg.reconnect_backoff, cfg.max_reconnect_delay)
            stream.on_replay_failed()
        if self._dealer is None:
            if self._reconnect_at is not None and now >= self._reconnect_at:
                self._reconnect_at = None
                self.metrics.reconnect_attempts.inc()
                self._open_dealer()
                stream.on_reconnected()
            return
        if stream.pending is not None:
            return
        if stream.recover_overflow(self.queue_depth, cfg.queue_capacity):
            return
        if stream.overflowed:
            return
        if now - self._last_index_resync >= cfg.replay_timeout and self.feed.take_resync():
            self._last_index_resync = now
            stream.resync(self.feed.resync_reason)
        elif self._probe_at is not None and now >= self._probe_at:
            self._probe_at = None
            stream.probe()
        elif cfg.idle_probe_interval > 0 and (
            now - max(self._last_live, self._last_replay) >= cfg.idle_probe_interval
        ):
            stream.probe()

