"""The front door's TCP listener: connections are accepted at once and set up at the loop's pace.

asyncio's own server accepts a batch of connections and sets every one of them up (transport,
protocol, ``connection_made``) before it looks at the listening socket again. Under a burst of
connects (upstream's ``sample/stress.py``: 5,000 from 50 threads) the kernel's accept queue
fills meanwhile, and a full queue drops connections: the client's SYN is retried a second
later. This listener empties the kernel's queue every time the socket is readable (an accept
costs ~10 µs, a set-up ~50) into a queue of its own, and sets connections up ``ADMIT_BATCH``
at a time, one batch per event loop turn, so the listening socket is looked at again every few
milliseconds whatever the burst. Past ``MAX_WAITING`` accepted connections not yet set up it
stops accepting, and the kernel's queue (``backlog``) holds the rest.

Everything runs on the event loop thread; each accepted socket passes from the queue to its
transport, never shared.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

ADMIT_BATCH = 32
"""Connections set up per event loop turn."""

MAX_WAITING = 8192
"""Accepted connections waiting to be set up before accepting pauses."""

ACCEPT_PER_TURN = 1024
"""Accepts per readable event (the loop's other work gets its turn in between)."""


class Listener:
    """TCP listening sockets for ``host:port`` (every address it resolves to, as asyncio's
    ``create_server``); each connection gets ``protocol_factory()`` as its protocol.

    ``start()`` binds (raising ``OSError``); ``close()`` is idempotent: it stops accepting,
    closes the listening sockets and the connections not set up yet, and cancels set-ups in
    flight.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, backlog: int,
                 protocol_factory: Callable[[], asyncio.Protocol]) -> None:  # fmt: skip
        self._loop = loop
        self._host = host
        self._port = port
        self._backlog = backlog
        self._factory = protocol_factory
        self.sockets: list[socket.socket] = []
        self._waiting: deque[socket.socket] = deque()
        self._admitting: set[asyncio.Task] = set()
        self._admit_scheduled = False
        self._accepting = False
        self._closed = False

    @property
    def port(self) -> int:
        """The port bound (the one the OS picked for port 0)."""
        return self.sockets[0].getsockname()[1]

    def start(self) -> "Listener":
        infos = socket.getaddrinfo(self._host or None, self._port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)  # fmt: skip
        port = self._port
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as asyncio: one socket per family
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and len(self.sockets) > 1:  # every address on the port picked
                    address = (address[0], self.port, *address[2:])
                sock.bind(address)
                sock.listen(self._backlog)
                sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        self._resume_accepting()
        return self

    # -- accepting -----------------------------------------------------------------------------

    def _resume_accepting(self) -> None:
        if not self._accepting and not self._closed:
            self._accepting = True
            for sock in self.sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause_accepting(self) -> None:
        if self._accepting:
            self._accepting = False
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, listening: socket.socket) -> None:
        waiting = self._waiting
        for _ in range(ACCEPT_PER_TURN):
            if len(waiting) >= MAX_WAITING:
                self._pause_accepting()
                break
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE, ENOBUFS...: the kernel keeps the connection queued
                log.warning("accept failed: %s", exc)
                break
            waiting.append(conn)
        if waiting and not self._admit_scheduled:
            self._admit_scheduled = True
            self._loop.call_soon(self._admit)

    def _admit(self) -> None:
        """Set up to ``ADMIT_BATCH`` accepted connections; the rest after the next turn's I/O."""
        self._admit_scheduled = False
        waiting = self._waiting
        for _ in range(min(ADMIT_BATCH, len(waiting))):
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(self._factory, waiting.popleft())
            )
            self._admitting.add(task)
            task.add_done_callback(self._admitted)
        if waiting:
            self._admit_scheduled = True
            self._loop.call_soon(self._admit)
        if len(waiting) < MAX_WAITING // 2:
            self._resume_accepting()

    def _admitted(self, task: asyncio.Task) -> None:
        self._admitting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a connection could not be set up: %s", task.exception())

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._pause_accepting()
        self._closed = True
        for sock in self.sockets:
            sock.close()
        while self._waiting:
            self._waiting.popleft().close()
        for task in list(self._admitting):
            task.cancel()


__all__ = ["Listener"]
