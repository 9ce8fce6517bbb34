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
- ``stop()`` sends what is queued, closes the sockets (ZeroMQ goes on delivering what it
  holds for ``drain_timeout`` seconds) and joins the thread; it is idempotent. The
  publisher is a context manager.
- Bind failures raise :class:`~edgellm.comm.errors.EndpointError` (an ``OSError``).
- With data parallelism, rank ``r`` adds ``r`` to the tcp ports of both endpoints (vLLM).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

from edgellm.comm.curve import CurveServer
from edgellm.comm.endpoints import Pub, Router
from edgellm.comm.loop import SocketThread
from edgellm.comm.urls import is_loopback, tcp_host
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
    curve: CurveServer | None = None
    """CURVE keys for both sockets (:mod:`edgellm.comm.curve`): only subscribers whose public
    key is in its clients' directory get in, and everything is encrypted. None: plain tcp,
    as vLLM publishes. A connecting PUB (``connect``) cannot be a CURVE server."""

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
        if self.curve is not None and self.connect:
            raise ValueError("a publisher that connects cannot authenticate its peers (curve)")


class KVEventPublisher:
    """PUB + ROUTER replay publisher of KV event batches (see the module docstring)."""

    def __init__(self, config: PublisherConfig | None = None):
        self.config = config or PublisherConfig()
        rank = self.config.data_parallel_rank
        self.pub_endpoint = offset_port(self.config.pub_endpoint, rank)
        self.replay_endpoint = (
            None
            if self.config.replay_endpoint is None
            else offset_port(self.config.replay_endpoint, rank)
        )
        self._lock = threading.Lock()  # orders seq assignment with the outgoing queue
        self._next_seq = 0
        self._outgoing: deque[tuple[int, bytes]] = deque()
        self._flush_due = False  # a flush is queued on the socket thread
        self._slots = threading.BoundedSemaphore(self.config.max_queue)
        self._state = "new"
        self._thread = _PublisherThread(f"kv-publisher-{rank}", self.config, self.pub_endpoint,
                                        self.replay_endpoint, self._take_outgoing)  # fmt: skip

    # --- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> "KVEventPublisher":
        """Bind/connect on the publisher thread; raise if that failed. Not restartable."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"publisher already {self._state}")
            self._state = "running"
        try:
            self._thread.start(timeout)
        except BaseException:
            with self._lock:
                self._state = "stopped"
            raise
        self.pub_endpoint = self._thread.pub_endpoint  # as bound: the port a * resolved to
        self.replay_endpoint = self._thread.replay_endpoint
        return self

    def stop(self) -> None:
        """Send what is queued, close everything (see the module docstring). Idempotent."""
        with self._lock:
            if self._state == "stopped":
                return
            self._state = "stopped"
        self._thread.stop(self.config.drain_timeout + 5.0)

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
            if not self._flush_due:
                self._flush_due = True
                self._thread.call_soon(self._thread.flush)
        return seq

    def _take_outgoing(self) -> list[tuple[int, bytes]]:
        """Everything queued, in sequence order (on the socket thread)."""
        with self._lock:
            self._flush_due = False
            out = list(self._outgoing)
            self._outgoing.clear()
        for _ in out:
            self._slots.release()
        return out


class _PublisherThread(SocketThread):
    """The publisher's socket thread: owns the PUB, the ROUTER and the replay buffer;
    ``take_outgoing()`` hands it the batches queued since, in sequence order."""

    def __init__(self, name: str, config: PublisherConfig, pub_endpoint: str,
                 replay_endpoint: str | None,
                 take_outgoing: Callable[[], list[tuple[int, bytes]]]) -> None:  # fmt: skip
        super().__init__(name)
        self._config = config
        self.pub_endpoint = pub_endpoint
        self.replay_endpoint = replay_endpoint
        self._take_outgoing = take_outgoing
        self._topic = config.topic.encode("utf-8")
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._router: Router | None = None

    def setup(self) -> None:
        config = self._config
        self._pub = self.open(Pub, self.pub_endpoint, bind=not config.connect,
                              sndhwm=config.hwm, ipv6=config.ipv6, curve=config.curve)  # fmt: skip
        if not config.connect:
            self.pub_endpoint = self._pub.last_endpoint
        if self.replay_endpoint is not None:
            # A full replay must not be cut by the high-water mark.
            self._router = self.open(Router, self.replay_endpoint, ipv6=config.ipv6,
                                     sndhwm=2 * config.buffer_steps + 16,
                                     curve=config.curve)  # fmt: skip
            self.replay_endpoint = self._router.last_endpoint
            self.add_reader(self._router, self._serve_replays)
        host = tcp_host(self.pub_endpoint)
        who = "loopback only" if host is None or is_loopback(host) else "open to the network"
        how = ("CURVE: keyed subscribers only, encrypted" if config.curve
               else "plain tcp: anyone who reaches it may subscribe")  # fmt: skip
        log.info("KV event publisher (%s; %s) on %s, replay %s", who, how, self.pub_endpoint,
                 self.replay_endpoint)  # fmt: skip

    def teardown(self) -> None:
        self.flush()  # what was queued before stop() (publish() refuses after it)
        # ZeroMQ keeps delivering what it holds for drain_timeout after the close.
        self._pub.close(linger=int(self._config.drain_timeout * 1000))

    def flush(self) -> None:
        """Send everything queued, in sequence order, and keep it for replay. (A PUB never
        blocks: at its high-water mark it drops, and replay fills the gap.)"""
        topic, send, keep = self._topic, self._pub.send_multipart, self._buffer.append
        for seq, payload in self._take_outgoing():
            send((topic, seq.to_bytes(8, "big"), payload), copy=False)
            keep((seq, payload))

    def _serve_replays(self) -> None:
        for frames in self._router.drain_multipart(64):  # type: ignore[union-attr]
            self._serve_replay(frames)

    def _serve_replay(self, frames: list[bytes]) -> None:
        router, buffer = self._router, self._buffer
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
