"""A KV event publisher wire-compatible with vLLM's ``ZmqEventPublisher``.

Used by our own engines and by tests; vLLM's subscribers and ours cannot tell the two apart.

Wire:

- live: PUB, multipart ``[topic, seq (8 bytes big-endian), payload]``; ``seq`` starts at 0
  for each publisher and grows by one per batch; ``payload`` is
  :func:`edgellm.protocol.kv_events.encode_batch` of the batch (``style`` chooses vLLM's
  array or map form);
- replay: ROUTER; a DEALER sends ``[b"", start_seq (8 bytes BE)]`` and gets one
  ``[b"", seq, payload]`` per buffered batch with ``seq >= start_seq``, then the end marker
  ``[b"", seq=-1, b""]``. A malformed request gets the end marker alone. The buffer keeps
  the last ``buffer_steps`` (10,000) batches.

Contract of :class:`KVEventPublisher`:

- ``start()`` binds (or connects) on the publisher's own thread, which owns both sockets,
  and returns once they are ready (raising what binding raised); ``pub_endpoint`` and
  ``replay_endpoint`` then hold the resolved addresses (``tcp://127.0.0.1:*`` binds a
  free port). Bind or connect is configuration (``PublisherConfig.connect``), never
  guessed from the address. The ROUTER always binds.
- ``publish(events)`` is thread-safe: it encodes the batch in the caller's thread, gives it
  the next sequence number and returns it; the batch is sent (and buffered for replay)
  in sequence order. It blocks while ``max_queue`` batches wait to be sent.
- ``stop()`` sends what is queued (for at most ``drain_timeout`` seconds), closes the
  sockets and joins the thread; it is idempotent. The publisher is a context manager.
- With data parallelism, rank ``r`` adds ``r`` to the tcp ports of both endpoints (vLLM).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Literal

import zmq

from edgellm.protocol.kv_events import EventBatch, KVEvent, encode_batch

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def offset_port(endpoint: str, rank: int) -> str:
    """``endpoint`` with its tcp port moved up by ``rank`` (data-parallel rank r uses base+r).

    Other transports and a wildcard port (``*``, ``0``: the OS picks) are left as they are.
    """
    if rank == 0 or not endpoint.startswith("tcp://"):
        return endpoint
    head, sep, port = endpoint.rpartition(":")
    if sep and port in ("*", "0"):
        return endpoint
    if not sep or not port.isdigit():
        raise ValueError(f"cannot offset the port of {endpoint!r} by rank {rank}")
    return f"{head}:{int(port) + rank}"


@dataclass(frozen=True)
class PublisherConfig:
    """Where and how a :class:`KVEventPublisher` publishes."""

    pub_endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = "tcp://*:5558"
    connect: bool = False
    """Connect the PUB socket to ``pub_endpoint`` instead of binding it."""
    buffer_steps: int = 10_000
    hwm: int = 100_000
    topic: str = ""
    data_parallel_rank: int = 0
    style: Literal["array", "map"] = "array"
    max_queue: int = 100_000
    drain_timeout: float = 1.0
    ipv6: bool = True
    """Enable IPv6 on both sockets (``tcp://*`` then listens on both stacks)."""

    def __post_init__(self) -> None:
        if self.buffer_steps < 1:
            raise ValueError("buffer_steps must be >= 1")
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if self.data_parallel_rank < 0:
            raise ValueError("data_parallel_rank must be >= 0")
        if self.style not in ("array", "map"):
            raise ValueError("style must be 'array' or 'map'")
        if self.hwm < 0 or self.drain_timeout < 0:
            raise ValueError("hwm and drain_timeout must be >= 0")


class KVEventPublisher:
    """PUB + ROUTER replay publisher of KV event batches (see the module docstring)."""

    def __init__(self, config: PublisherConfig | None = None, *, ctx: zmq.Context | None = None):
        self.config = config or PublisherConfig()
        self._ctx = ctx if ctx is not None else zmq.Context.instance()
        rank = self.config.data_parallel_rank
        self.pub_endpoint = offset_port(self.config.pub_endpoint, rank)
        self.replay_endpoint = (
            None
            if self.config.replay_endpoint is None
            else offset_port(self.config.replay_endpoint, rank)
        )
        self._topic = self.config.topic.encode("utf-8")
        self._lock = threading.Lock()  # orders seq assignment with the outgoing queue
        self._next_seq = 0
        self._outgoing: deque[tuple[int, bytes]] = deque()
        self._slots = threading.BoundedSemaphore(self.config.max_queue)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._signalled = False
        self._state = "new"
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"kv-publisher-{rank}", daemon=True
        )

    # --- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> "KVEventPublisher":
        """Bind/connect on the publisher thread; raise if that failed. Not restartable."""
        if self._state != "new":
            raise RuntimeError(f"publisher already {self._state}")
        self._state = "running"
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop()
            raise TimeoutError("KV event publisher thread did not start")
        if self._start_error is not None:
            self._thread.join()
            self._state = "stopped"
            self._close_pipe()
            raise self._start_error
        return self

    def stop(self) -> None:
        """Send what is queued (bounded by ``drain_timeout``), close everything. Idempotent."""
        with self._lock:
            if self._state != "running":
                if self._state == "new":
                    self._state = "stopped"
                    self._close_pipe()
                return
            self._state = "stopping"
        self._wake()
        self._thread.join()
        self._state = "stopped"
        self._close_pipe()

    def __enter__(self) -> "KVEventPublisher":
        if self._state == "new":
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def next_seq(self) -> int:
        """The sequence number the next published batch will get."""
        return self._next_seq

    # --- publishing ------------------------------------------------------------------

    def publish(
        self, events: EventBatch | Iterable[KVEvent], *, ts: float | None = None
    ) -> int:
        """Queue one batch for sending and return its sequence number.

        ``events`` is an :class:`EventBatch` (sent as is, its rank filled in when unset)
        or an iterable of events (stamped with ``ts`` or the current time). Raises
        ``RuntimeError`` if the publisher is not running.
        """
        if isinstance(events, EventBatch):
            batch = events
            if batch.data_parallel_rank is None:
                batch = EventBatch(batch.ts, batch.events, self.config.data_parallel_rank)
        else:
            batch = EventBatch(
                time.time() if ts is None else ts, list(events), self.config.data_parallel_rank
            )
        return self.publish_payload(encode_batch(batch, self.config.style))

    def publish_payload(self, payload: bytes) -> int:
        """Queue an already-encoded payload (any bytes: tests inject malformed ones)."""
        self._slots.acquire()
        with self._lock:
            if self._state != "running":
                self._slots.release()
                raise RuntimeError(f"publisher is {self._state}")
            seq = self._next_seq
            self._next_seq = seq + 1
            self._outgoing.append((seq, payload))
        self._wake()
        return seq

    def _wake(self) -> None:
        # Set the flag before writing: the thread clears it before it drains the queue,
        # so an item appended while the flag is still set is drained by that pass.
        if not self._signalled:
            self._signalled = True
            try:
                os.write(self._wake_w, b"\x01")
            except (BlockingIOError, OSError):
                pass

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # --- the socket thread -----------------------------------------------------------

    def _run(self) -> None:
        pub = router = None
        try:
            pub = self._ctx.socket(zmq.PUB)
            pub.linger = 0
            pub.sndhwm = self.config.hwm
            pub.ipv6 = self.config.ipv6
            if self.config.connect:
                pub.connect(self.pub_endpoint)
            else:
                pub.bind(self.pub_endpoint)
                self.pub_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.replay_endpoint is not None:
                router = self._ctx.socket(zmq.ROUTER)
                router.linger = 0
                router.ipv6 = self.config.ipv6
                # A full replay must not be cut by the high-water mark.
                router.sndhwm = 2 * self.config.buffer_steps + 16
                router.bind(self.replay_endpoint)
                self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException as exc:  # reported to start()
            self._start_error = exc
            for sock in (pub, router):
                if sock is not None:
                    sock.close(linger=0)
            self._started.set()
            return
        self._started.set()
        log.info("KV event publisher on %s (replay %s)", self.pub_endpoint, self.replay_endpoint)
        try:
            self._serve(pub, router)
        finally:
            pub.close(linger=0)
            if router is not None:
                router.close(linger=0)

    def _serve(self, pub: zmq.Socket, router: zmq.Socket | None) -> None:
        buffer: deque[tuple[int, bytes]] = deque(maxlen=self.config.buffer_steps)
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if router is not None:
            poller.register(router, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                self._signalled = False
                self._send_outgoing(pub, buffer)
            if router is not None and router in ready:
                while router.poll(0, zmq.POLLIN):
                    self._serve_replay(router, buffer)
            if self._state == "stopping":
                deadline = time.monotonic() + self.config.drain_timeout
                while self._outgoing and time.monotonic() < deadline:
                    self._send_outgoing(pub, buffer)
                if self._outgoing:
                    log.warning("KV event publisher dropped %d unsent batches", len(self._outgoing))
                return

    def _send_outgoing(self, pub: zmq.Socket, buffer: deque[tuple[int, bytes]]) -> None:
        topic = self._topic
        while self._outgoing:
            seq, payload = self._outgoing.popleft()
            self._slots.release()
            pub.send_multipart((topic, seq.to_bytes(8, "big"), payload), copy=False)
            buffer.append((seq, payload))

    def _serve_replay(self, router: zmq.Socket, buffer: deque[tuple[int, bytes]]) -> None:
        frames = router.recv_multipart()
        if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
            log.warning("malformed replay request (%d frames); answering the end marker", len(frames))
            if frames and len(frames[0]) > 0:
                router.send_multipart((frames[0], b"", END_SEQ, b""))
            return
        identity, _, start_bytes = frames
        start = int.from_bytes(start_bytes, "big")
        if buffer:
            first = buffer[0][0]
            # The buffer holds consecutive sequence numbers: index, don't scan.
            for i in range(max(0, start - first), len(buffer)):
                seq, payload = buffer[i]
                router.send_multipart((identity, b"", seq.to_bytes(8, "big"), payload), copy=False)
        router.send_multipart((identity, b"", END_SEQ, b""))
