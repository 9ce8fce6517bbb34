"""PUB / SUB / PUSH / PULL endpoints of the comm layer, with bind-or-connect explicit.

Roles follow the C++ ``pzmq`` modes: PUB and PULL bind, SUB and PUSH connect (a SUB takes
every topic). Each endpoint wraps one persistent socket that belongs to the thread or
asyncio task that uses it; pass a ``zmq.asyncio.Context`` to get awaitable sockets.

Closing is idempotent; closing a binding endpoint removes its ``ipc://`` file.
"""

from __future__ import annotations

import logging
from typing import Generic, TypeVar

import zmq

from edgellm.comm.urls import bind, remove_ipc_file

log = logging.getLogger(__name__)

SocketT = TypeVar("SocketT", bound=zmq.Socket)

RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000
PUSH_SEND_TIMEOUT_MS = 3000


class Endpoint(Generic[SocketT]):
    """One socket bound or connected to one URL."""

    socket_type: int = -1
    binds: bool = False

    def __init__(self, url: str, ctx: zmq.Context | None = None, *, dir_mode: int = 0o700):
        self.url = url
        ctx = ctx if ctx is not None else zmq.Context.instance()
        sock = ctx.socket(self.socket_type)
        sock.linger = 0
        try:
            self._configure(sock)
            if self.binds:
                bind(sock, url, dir_mode)
            else:
                sock.connect(url)
        except BaseException:
            sock.close(linger=0)
            raise
        self.socket: SocketT = sock  # type: ignore[assignment]
        self._closed = False

    def _configure(self, sock: zmq.Socket) -> None:
        if not self.binds:
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the socket (no linger) and remove a bound ipc file; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.socket.close(linger=0)
        if self.binds:
            remove_ipc_file(self.url)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("bound" if self.binds else "connected")
        return f"<{type(self).__name__} {self.url} {state}>"


class Publisher(Endpoint[SocketT]):
    """PUB, bound: a unit's output url or the manager's inference url."""

    socket_type = zmq.PUB
    binds = True


class Subscriber(Endpoint[SocketT]):
    """SUB, connected, subscribed to everything."""

    socket_type = zmq.SUB

    def _configure(self, sock: zmq.Socket) -> None:
        super()._configure(sock)
        sock.setsockopt(zmq.SUBSCRIBE, b"")


class Pusher(Endpoint[SocketT]):
    """PUSH, connected: replies to a client's connection (``zmq_com``).

    Sends time out after 3 s (upstream's ``ZMQ_SNDTIMEO``) instead of blocking for ever
    on a peer that went away; ``zmq.Again`` is raised then.
    """

    socket_type = zmq.PUSH

    def _configure(self, sock: zmq.Socket) -> None:
        super()._configure(sock)
        sock.setsockopt(zmq.SNDTIMEO, PUSH_SEND_TIMEOUT_MS)


class Puller(Endpoint[SocketT]):
    """PULL, bound: the manager's per-connection inbox."""

    socket_type = zmq.PULL
    binds = True
