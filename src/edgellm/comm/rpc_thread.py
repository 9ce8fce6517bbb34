"""RPC on threads: a service on its own socket thread, a blocking client, and the one
liveness probe (:func:`probe`) that the unit manager, units and tests share."""

from __future__ import annotations

import threading
import time

from edgellm.comm.endpoints import Req, Router
from edgellm.comm.errors import CommError, RpcTimeout
from edgellm.comm.loop import SocketThread
from edgellm.comm.rpc import DEFAULT_TIMEOUT, RpcClientBase, RpcDispatcher, RpcHandler, answer
from edgellm.comm.urls import DEFAULT_RUNTIME_DIR, endpoint_exists, rpc_url
from edgellm.protocol import rpc as wire

PROBE_TIMEOUT = 0.3
"""Seconds a live service takes at most to answer ``list_action`` (it answers at once)."""


class RpcServer(SocketThread):
    """Serves a dispatcher at ``rpc.<name>`` (or a full url) on a socket thread.

    Handlers run on that thread, one at a time. ``start()`` returns once the endpoint is
    bound (raising :class:`~edgellm.comm.errors.EndpointError` if it cannot be);
    ``stop()`` is idempotent and removes the ipc file.
    """

    def __init__(self, name: str, dispatcher: RpcDispatcher | None = None, *,
                 runtime_dir: str = DEFAULT_RUNTIME_DIR,
                 dir_mode: int = 0o700) -> None:  # fmt: skip
        self.url = rpc_url(name, runtime_dir)
        super().__init__(f"rpc:{self.url}")
        self.dispatcher = dispatcher or RpcDispatcher()
        self._dir_mode = dir_mode

    def register(self, action: str, handler: RpcHandler) -> None:
        self.dispatcher.register(action, handler)

    def setup(self) -> None:
        self._router = self.open(Router, self.url, dir_mode=self._dir_mode)
        self.add_reader(self._router, self._serve)

    def _serve(self) -> None:
        for frames in self._router.drain_multipart(64):
            reply = answer(frames, self.dispatcher)
            if reply is not None:
                self._router.send_multipart(reply)


class RpcClient(RpcClientBase):
    """Blocking client of one RPC service over one persistent REQ socket.

    Calls are serialised by a lock, so threads may share a client; it is cheaper to give
    each thread its own.
    """

    def __init__(self, name: str, *, timeout: float = DEFAULT_TIMEOUT,
                 runtime_dir: str = DEFAULT_RUNTIME_DIR) -> None:  # fmt: skip
        super().__init__(name, timeout=timeout, runtime_dir=runtime_dir)
        self._req: Req | None = None
        self._lock = threading.Lock()

    def call(self, action: str, data: bytes | str = b"", timeout: float | None = None) -> bytes:
        """Send ``[action, data]``; the reply frame. Raises ``RpcUnavailable``,
        ``RpcTimeout`` (after ``timeout`` seconds, default the client's) or
        ``RpcRemoteError`` (see :mod:`edgellm.comm.errors`)."""
        with self._lock:
            frames, seconds = self._begin(action, data, timeout)
            if self._req is None:
                self._req = Req(self.url)
            req = self._req
            if req.send_multipart(frames) and req.poll(seconds):
                reply = req.drain(1)
                if reply:
                    return self._read(reply[0])
            self._forget_sockets()
            raise self._timed_out(action, seconds)

    def _forget_sockets(self) -> None:
        if self._req is not None:
            self._req.close()
            self._req = None

    def close(self) -> None:
        with self._lock:
            super().close()


def probe(name: str, *, runtime_dir: str = DEFAULT_RUNTIME_DIR,
          timeout: float = PROBE_TIMEOUT) -> list[str] | None:  # fmt: skip
    """The actions of the live service ``name`` (``rpc.<name>`` or a url); None when none
    answers ``list_action`` within ``timeout`` (no ipc file, or a stale one of a dead
    process). A service that answers something else is alive: ``[]``."""
    url = rpc_url(name, runtime_dir)
    if not endpoint_exists(url):
        return None
    with RpcClient(url, timeout=timeout) as client:
        try:
            reply = client.call(wire.LIST_ACTION)
        except CommError:
            return None
    try:
        return wire.decode_actions(reply)
    except ValueError:
        return []


def wait_for_service(name: str, *, runtime_dir: str = DEFAULT_RUNTIME_DIR,
                     timeout: float = 10.0) -> list[str]:  # fmt: skip
    """Block until service ``name`` answers :func:`probe`; its actions. Raises
    :class:`~edgellm.comm.errors.RpcTimeout` when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    url = rpc_url(name, runtime_dir)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RpcTimeout(f"service {name!r} not up within {timeout}s")
        if not endpoint_exists(url):
            # No event tells that a file appeared; the service binds within milliseconds.
            time.sleep(min(0.02, remaining))
            continue
        actions = probe(url, timeout=min(1.0, remaining))
        if actions is not None:
            return actions


__all__ = ["PROBE_TIMEOUT", "RpcClient", "RpcServer", "probe", "wait_for_service"]
