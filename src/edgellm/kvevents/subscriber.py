"""One pod's KV event client: SUB for the live stream, DEALER for replay, on one thread.

The thread owns both sockets and the pod's timers; what reaches the index and in what
order is decided by the pod's :class:`~edgellm.kvevents.stream.PodStream` (read its
docstring for the guarantees: exactly-once ordered application, anchored gap replays,
resync on restart or lost ranges, bounded queue). The thread never decodes or touches the
index: batches go, as raw payloads, into the manager's apply queue (:class:`BatchSink`).

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
import os
import threading
import time
from typing import Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from edgellm.discovery.pod import Pod
from edgellm.kvevents.config import SubscriberConfig
from edgellm.kvevents.metrics import PodMetrics
from edgellm.kvevents.stream import PodStream

log = logging.getLogger(__name__)

_END_SEQ = -1
_LIVE_DRAIN = 1000  # live messages read per wake-up before looking at the other socket
_SETTLE_AFTER_CONNECT = 0.2  # s from the SUB's TCP connection to its subscription in effect


class BatchSink(Protocol):
    """Where a client sends work for the index (the manager's apply queue)."""

    def submit_batch(self, sub: "PodSubscriber", seq: int, payload: bytes) -> None:
        """Apply this batch after everything submitted before it."""

    def submit_clear(self, sub: "PodSubscriber") -> None:
        """Drop the pod's entries (after everything submitted before it)."""


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
        self.config = config or SubscriberConfig()
        self.metrics = metrics
        self._sink = sink
        self._ctx = ctx if ctx is not None else zmq.Context.instance()
        # Written by the apply thread only:
        self.applied_seq: int | None = None
        self.dequeued = 0
        self.resync_requested = False
        self.resync_reason = "index_error"
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
        self._resume: tuple[int, int] | None = None

    # --- lifecycle (any thread) ------------------------------------------------------

    def resume_from(self, seq: int, digest: int) -> "PodSubscriber":
        """Before :meth:`start`: continue after batch ``seq`` (applied by another writer of
        a shared index) instead of clearing and replaying all (``PodStream.resume``)."""
        self._resume = (seq, digest)
        return self

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
    def alive(self) -> bool:
        """The client's thread is running (it stops only when told to, or on a bug)."""
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return self.enqueued - self.dequeued

    def request_resync(self, reason: str = "index_error") -> None:
        """Ask for the pod's entries to be dropped and rebuilt (called by the apply thread);
        ``reason`` labels the resync in the metrics."""
        self.resync_reason = reason
        self.resync_requested = True

    @property
    def quiescent(self) -> bool:
        """No replay outstanding, nothing held, nothing queued (for tests and benches)."""
        return self._idle.is_set() and self.queue_depth == 0

    # --- StreamPort (called on the socket thread by the stream) ------------------------

    @property
    def replay_channel_up(self) -> bool:
        return self._dealer is not None

    def submit(self, seq: int, payload: bytes) -> bool:
        if self.queue_depth >= self.config.queue_capacity:
            return False
        self.enqueued += 1
        self._sink.submit_batch(self, seq, payload)
        return True

    def clear(self) -> None:
        self._sink.submit_clear(self)

    def send_replay_request(self, start: int) -> None:
        assert self._dealer is not None
        now = time.monotonic()
        self._replay_deadline = now + self.config.replay_timeout
        self._last_replay = now
        self.metrics.replay_requests.inc()
        try:
            self._dealer.send_multipart([b"", start.to_bytes(8, "big")], zmq.NOBLOCK)
        except zmq.Again:
            self._replay_deadline = now  # cannot even queue the request: fails at once

    def restart_replay_channel(self) -> None:
        self._close_dealer()
        self.metrics.reconnect_attempts.inc()
        self._open_dealer()

    def replay_answered(self) -> None:
        self._delay = self.config.reconnect_delay

    # --- the socket thread -----------------------------------------------------------

    def _run(self) -> None:
        self._sub: zmq.Socket | None = None
        self._dealer: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._poller.register(self._stop_r, zmq.POLLIN)
        self._stream = PodStream(self.pod_key, self, self.metrics,
                                 hold_capacity=self.config.hold_capacity)  # fmt: skip
        self._delay = self.config.reconnect_delay
        self._reconnect_at: float | None = None
        self._replay_deadline = 0.0
        now = time.monotonic()
        self._last_live = now
        self._last_replay = now
        self._last_index_resync = 0.0
        self._monitor: zmq.Socket | None = None
        self._probe_at: float | None = None
        self._was_connected = False
        try:
            self._open_sub()
            self._open_dealer()
            if self._resume is not None:
                self._stream.resume(*self._resume)
            else:
                self._stream.start()
            while self._loop_once():
                pass
        except Exception:
            log.exception("KV event client of %s failed", self.pod_key)
            self.metrics.error("socket")
        finally:
            if self._monitor is not None:
                self._sub.disable_monitor()
                self._monitor.close(linger=0)
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
        # Connection events of the SUB drive the connection metrics; a reconnection may
        # follow a publisher restart and leaves a window before the subscription takes
        # effect: verify the stream, and probe once the subscription is in effect.
        self._monitor = sub.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
        )
        self._poller.register(self._monitor, zmq.POLLIN)
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
        ready = dict(self._poller.poll(max(1, int(self.config.poll_timeout * 1000))))
        if self._stop_r in ready:
            return False
        if self._monitor in ready:  # first: a new connection's batches follow its event
            self._read_monitor()
        if self._sub in ready:
            self._read_live()
        if self._dealer is not None and self._dealer in ready:
            self._read_replay()
        self._timers(time.monotonic())
        if self._stream.busy:
            self._idle.clear()
        else:
            self._idle.set()
        return True

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
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self._set_connected(True)
                if self._was_connected:
                    self._stream.on_link_reset()
                self._was_connected = True
                self._probe_at = time.monotonic() + _SETTLE_AFTER_CONNECT
            elif event == zmq.EVENT_DISCONNECTED:
                self._set_connected(False)
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self.metrics.reconnect_attempts.inc()

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
            if len(body) != 2 or len(body[0]) != 8:
                self.metrics.error("replay_protocol")
                continue
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

    def _timers(self, now: float) -> None:
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
        if self.resync_requested and now - self._last_index_resync >= cfg.replay_timeout:
            self.resync_requested = False
            self._last_index_resync = now
            stream.resync(self.resync_reason)
        elif self._probe_at is not None and now >= self._probe_at:
            self._probe_at = None
            stream.probe()
        elif cfg.idle_probe_interval > 0 and (
            now - max(self._last_live, self._last_replay) >= cfg.idle_probe_interval
        ):
            stream.probe()

