"""RPC of the StackFlow comm layer: two-frame requests, one-frame replies.

Wire (compatible with the C++ ``pzmq`` RPC_FUN / RPC_CALL modes, which are REP / REQ):

- request: ``[action, data]``; reply: one frame.
- an unknown action is answered ``NotAction``; every server answers ``list_action`` with
  ``{"actions":["a","b",...]}``.

Pieces, one core and thin adapters (as pyzmq does for its auth module):

- :class:`RpcDispatcher` maps actions to handlers ``fn(data: bytes) -> bytes | str``; pure.
- :class:`RpcServer` serves a dispatcher on its own thread (ROUTER socket, so a malformed
  request still gets an answer); :func:`serve_rpc` does the same as an asyncio task on a
  ``zmq.asyncio`` socket, for daemons that keep every socket in one event loop.
- :class:`RpcClient` (blocking) and :class:`AsyncRpcClient` (asyncio) call a service with a
  persistent REQ socket and a deadline (3 s by default, upstream's). A call that gets no
  answer raises :class:`RpcTimeout`, never hangs; the socket is then replaced, as REQ
  cannot send again before it receives. A missing ``ipc://`` endpoint raises
  :class:`RpcUnavailable` at once.

Exceptions::

    CommError
     ├── RpcUnavailable   nothing is bound at the service's ipc path
     └── RpcTimeout       no reply within the deadline
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable, Iterable

import zmq
import zmq.asyncio

from edgellm.comm.urls import (
    DEFAULT_RUNTIME_DIR,
    bind,
    endpoint_exists,
    remove_ipc_file,
    rpc_url,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3.0
NOT_ACTION = b"NotAction"
LIST_ACTION = "list_action"

RpcHandler = Callable[[bytes], "bytes | str"]


class CommError(Exception):
    """A comm-layer call failed."""


class RpcUnavailable(CommError):
    """The service's ipc endpoint does not exist (the process is not running)."""


class RpcTimeout(CommError):
    """The service did not answer within the deadline."""


class RpcDispatcher:
    """Action table of one RPC service. Thread-safe registration; dispatch never raises."""

    def __init__(self, handlers: dict[str, RpcHandler] | None = None):
        self._handlers: dict[str, RpcHandler] = {}
        self._lock = threading.Lock()
        for action, fn in (handlers or {}).items():
            self.register(action, fn)

    def register(self, action: str, handler: RpcHandler) -> None:
        with self._lock:
            self._handlers[action] = handler

    def unregister(self, action: str) -> None:
        with self._lock:
            self._handlers.pop(action, None)

    def actions(self) -> list[str]:
        with self._lock:
            return [LIST_ACTION, *self._handlers]

    def dispatch(self, frames: list[bytes]) -> bytes:
        """Answer one request (its frames after the routing envelope)."""
        if len(frames) != 2:
            return NOT_ACTION
        try:
            action = frames[0].decode("utf-8")
        except UnicodeDecodeError:
            return NOT_ACTION
        if action == LIST_ACTION:
            return json.dumps({"actions": self.actions()}, separators=(",", ":")).encode()
        with self._lock:
            handler = self._handlers.get(action)
        if handler is None:
            return NOT_ACTION
        try:
            reply = handler(frames[1])
        except Exception:  # a handler bug must not kill the service
            log.exception("RPC handler %r failed", action)
            return NOT_ACTION
        if isinstance(reply, str):
            return reply.encode("utf-8")
        return bytes(reply)


def _split_routed(frames: list[bytes]) -> tuple[list[bytes], list[bytes]] | None:
    """ROUTER frames -> (routing envelope incl. empty delimiter, body) or None if malformed."""
    try:
        delimiter = frames.index(b"")
    except ValueError:
        return None
    return frames[: delimiter + 1], frames[delimiter + 1 :]


class RpcServer:
    """Serves a dispatcher at ``rpc.<name>`` on a dedicated thread.

    ``start()`` returns once the endpoint is bound (raises if binding failed);
    ``stop()`` is idempotent and removes the ipc file.
    """

    def __init__(
        self,
        name: str,
        dispatcher: RpcDispatcher | None = None,
        *,
        runtime_dir: str = DEFAULT_RUNTIME_DIR,
        ctx: zmq.Context | None = None,
        dir_mode: int = 0o700,
    ):
        self.url = rpc_url(name, runtime_dir)
        self.dispatcher = dispatcher or RpcDispatcher()
        self._ctx = ctx or zmq.Context.instance()
        self._dir_mode = dir_mode
        self._thread: threading.Thread | None = None
        self._wake_url = f"inproc://rpc-stop-{id(self)}"
        self._wake: zmq.Socket | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False

    def register(self, action: str, handler: RpcHandler) -> None:
        self.dispatcher.register(action, handler)

    def start(self, timeout: float = 5.0) -> "RpcServer":
        if self._thread is not None:
            raise RuntimeError("RpcServer already started")
        self._wake = self._ctx.socket(zmq.PAIR)
        self._wake.linger = 0
        self._wake.bind(self._wake_url)
        self._thread = threading.Thread(target=self._run, name=f"rpc:{self.url}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"RPC server {self.url} did not start")
        if self._error is not None:
            self._thread.join()
            self._wake.close()
            raise self._error
        return self

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        stop = self._ctx.socket(zmq.PAIR)
        stop.linger = 0
        try:
            bind(sock, self.url, self._dir_mode)
            stop.connect(self._wake_url)
        except BaseException as exc:
            self._error = exc
            sock.close()
            stop.close()
            self._started.set()
            return
        self._started.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(stop, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if stop in ready:
                    break
                if sock in ready:
                    self._serve_one(sock)
        finally:
            sock.close(linger=0)
            stop.close(linger=0)
            remove_ipc_file(self.url)

    def _serve_one(self, sock: zmq.Socket) -> None:
        frames = sock.recv_multipart()
        routed = _split_routed(frames)
        if routed is None:
            return  # not from a REQ/DEALER peer speaking the envelope: nowhere to answer
        envelope, body = routed
        sock.send_multipart([*envelope, self.dispatcher.dispatch(body)])

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._thread is None:
            return
        if self._wake is not None:
            try:
                self._wake.send(b"")
            except zmq.ZMQError:
                pass
        self._thread.join(timeout)
        if self._wake is not None:
            self._wake.close(linger=0)

    def __enter__(self) -> "RpcServer":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info) -> None:
        self.stop()


async def serve_rpc(sock: zmq.asyncio.Socket, dispatcher: RpcDispatcher) -> None:
    """Serve ``dispatcher`` on an already-bound asyncio ROUTER socket until cancelled.

    Handlers run inline in the event loop: keep them quick (the manager's are).
    """
    while True:
        frames = await sock.recv_multipart()
        routed = _split_routed(frames)
        if routed is None:
            continue
        envelope, body = routed
        await sock.send_multipart([*envelope, dispatcher.dispatch(body)])


def _new_req(ctx: zmq.Context, url: str) -> zmq.Socket:
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.connect(url)
    return sock


class RpcClient:
    """Blocking client of one RPC service over one persistent REQ socket.

    Calls are serialised by a lock, so one client may be shared by threads; it is cheaper
    to give each thread its own. ``close()`` is idempotent.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        runtime_dir: str = DEFAULT_RUNTIME_DIR,
        ctx: zmq.Context | None = None,
    ):
        self.url = rpc_url(name, runtime_dir)
        self.timeout = timeout
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._lock = threading.Lock()
        self._closed = False

    def call(self, action: str, data: bytes | str = b"", timeout: float | None = None) -> bytes:
        """Send ``[action, data]`` and return the reply frame.

        Raises :class:`RpcUnavailable` if the ipc endpoint is missing and
        :class:`RpcTimeout` if no reply arrives in ``timeout`` seconds.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        deadline_s = self.timeout if timeout is None else timeout
        with self._lock:
            if self._closed:
                raise CommError("RpcClient is closed")
            if not endpoint_exists(self.url):
                self._drop()
                raise RpcUnavailable(f"no RPC service at {self.url}")
            if self._sock is None:
                self._sock = _new_req(self._ctx, self.url)
            sock = self._sock
            sock.send_multipart([action.encode("utf-8"), data])
            if sock.poll(int(deadline_s * 1000), zmq.POLLIN):
                return sock.recv()
            self._drop()
            raise RpcTimeout(f"{self.url} did not answer {action!r} within {deadline_s:.3g}s")

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncRpcClient:
    """asyncio client of one RPC service: concurrent calls each borrow a REQ socket from a
    small pool (REQ allows one outstanding request), so one slow call does not queue the
    others behind it. Use from one event loop."""

    def __init__(
        self,
        name: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        runtime_dir: str = DEFAULT_RUNTIME_DIR,
        ctx: zmq.asyncio.Context | None = None,
        max_idle: int = 8,
    ):
        self.url = rpc_url(name, runtime_dir)
        self.timeout = timeout
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._idle: list[zmq.asyncio.Socket] = []
        self._max_idle = max_idle
        self._closed = False

    async def call(
        self, action: str, data: bytes | str = b"", timeout: float | None = None
    ) -> bytes:
        """As :meth:`RpcClient.call`, without blocking the loop."""
        if self._closed:
            raise CommError("AsyncRpcClient is closed")
        if isinstance(data, str):
            data = data.encode("utf-8")
        deadline_s = self.timeout if timeout is None else timeout
        if not endpoint_exists(self.url):
            self._close_idle()
            raise RpcUnavailable(f"no RPC service at {self.url}")
        sock = self._idle.pop() if self._idle else _new_req(self._ctx, self.url)
        try:
            await sock.send_multipart([action.encode("utf-8"), data])
            if await sock.poll(int(deadline_s * 1000), zmq.POLLIN):
                reply = await sock.recv()
            else:
                raise RpcTimeout(
                    f"{self.url} did not answer {action!r} within {deadline_s:.3g}s"
                )
        except BaseException:
            sock.close(linger=0)
            raise
        if self._closed or len(self._idle) >= self._max_idle:
            sock.close(linger=0)
        else:
            self._idle.append(sock)
        return reply

    def _close_idle(self) -> None:
        while self._idle:
            self._idle.pop().close(linger=0)

    def close(self) -> None:
        self._closed = True
        self._close_idle()


def wait_for_service(
    name: str,
    *,
    runtime_dir: str = DEFAULT_RUNTIME_DIR,
    timeout: float = 10.0,
    ctx: zmq.Context | None = None,
) -> list[str]:
    """Block until service ``name`` answers ``list_action``; return its actions.

    Raises :class:`RpcTimeout` when ``timeout`` passes first.
    """
    deadline = time.monotonic() + timeout
    with RpcClient(name, runtime_dir=runtime_dir, ctx=ctx) as client:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RpcTimeout(f"service {name!r} not up within {timeout}s")
            try:
                reply = client.call(LIST_ACTION, b"", timeout=min(1.0, remaining))
                return list(json.loads(reply)["actions"])
            except RpcUnavailable:
                time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
            except RpcTimeout:
                continue


def bind_router(
    ctx: zmq.Context, name: str, runtime_dir: str = DEFAULT_RUNTIME_DIR, dir_mode: int = 0o700
) -> tuple[zmq.Socket, str]:
    """A bound ROUTER socket for :func:`serve_rpc`, and its URL."""
    url = rpc_url(name, runtime_dir)
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    try:
        bind(sock, url, dir_mode)
    except BaseException:
        sock.close()
        raise
    return sock, url


__all__: Iterable[str] = [
    "AsyncRpcClient",
    "CommError",
    "DEFAULT_TIMEOUT",
    "LIST_ACTION",
    "NOT_ACTION",
    "RpcClient",
    "RpcDispatcher",
    "RpcServer",
    "RpcTimeout",
    "RpcUnavailable",
    "bind_router",
    "serve_rpc",
    "wait_for_service",
]
