"""RPC of the StackFlow comm layer: the core that its thread and asyncio adapters share.

Wire: :mod:`edgellm.protocol.rpc` (two-frame requests, one-frame replies, ``NotAction``,
``list_action``, error reports). Pieces, as pyzmq shapes its ``_future.py`` core with
``asyncio.py`` beside it:

- :class:`RpcDispatcher`: the action table of a service, :func:`answer`: one request
  off a ROUTER (which answers even a malformed request, unlike REP);
- :class:`RpcClientBase`: what a call does around its wait (the service's ipc file looked
  for, the request's frames, the deadline, the reply read);
- ``edgellm.comm.rpc_thread``: :class:`RpcServer` on a socket thread, the blocking
  :class:`RpcClient`, the liveness :func:`probe` and :func:`wait_for_service`;
- ``edgellm.comm.rpc_asyncio``: :class:`AsyncRpcServer` and :class:`AsyncRpcClient`, on
  the caller's event loop.

A call that gets no answer raises :class:`~edgellm.comm.errors.RpcTimeout`, never hangs
(the REQ socket is then replaced: REQ cannot send again before it receives); a missing
``ipc://`` endpoint raises :class:`~edgellm.comm.errors.RpcUnavailable` at once; a
handler's crash comes back as :class:`~edgellm.comm.errors.RpcRemoteError`.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from edgellm.comm.errors import CommError, RpcRemoteError, RpcTimeout, RpcUnavailable
from edgellm.comm.urls import DEFAULT_RUNTIME_DIR, endpoint_exists, rpc_url
from edgellm.protocol import rpc as wire

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3.0
"""Seconds a call waits for its reply (upstream's REQ timeout)."""

RpcHandler = Callable[[bytes], "bytes | str"]


class RpcDispatcher:
    """Action table of one RPC service: handlers ``fn(data) -> bytes | str``.

    Registration is thread-safe. :meth:`dispatch` never raises: an unknown action or a
    malformed request is answered ``NotAction``; a handler that raises is logged with its
    traceback and answered with an error report naming the action and the exception.
    """

    def __init__(self, handlers: dict[str, RpcHandler] | None = None):
        self._handlers: dict[str, RpcHandler] = {}
        self._lock = threading.Lock()
        for action, fn in (handlers or {}).items():
            self.register(action, fn)

    def register(self, action: str, handler: RpcHandler) -> None:
        if action == wire.LIST_ACTION:
            raise ValueError(f"{wire.LIST_ACTION!r} is answered by every service")
        with self._lock:
            self._handlers[action] = handler

    def unregister(self, action: str) -> None:
        with self._lock:
            self._handlers.pop(action, None)

    def actions(self) -> list[str]:
        with self._lock:
            return [wire.LIST_ACTION, *self._handlers]

    def dispatch(self, frames: list[bytes]) -> bytes:
        """The reply to one request (its frames after the routing envelope)."""
        try:
            action, data = wire.parse_request(frames)
        except wire.RpcRequestError:
            return wire.NOT_ACTION
        if action == wire.LIST_ACTION:
            return wire.encode_actions(self.actions())
        with self._lock:
            handler = self._handlers.get(action)
        if handler is None:
            return wire.NOT_ACTION
        try:
            reply = handler(data)
        except Exception as exc:  # the service lives on; the caller hears what went wrong
            log.exception("RPC handler %r failed", action)
            return wire.encode_error(action, f"{type(exc).__name__}: {exc}")
        return reply.encode("utf-8") if isinstance(reply, str) else bytes(reply)


def answer(frames: list[bytes], dispatcher: RpcDispatcher) -> list[bytes] | None:
    """The ROUTER frames answering ``frames`` (routing envelope + reply), or None when
    they carry no envelope (not from a REQ/DEALER peer: nowhere to answer)."""
    try:
        delimiter = frames.index(b"")
    except ValueError:
        return None
    return [*frames[: delimiter + 1], dispatcher.dispatch(frames[delimiter + 1 :])]


class RpcClientBase:
    """A client of one RPC service: ``name`` (``sys``, ``llm``...) or a full url.

    Subclasses wait for the reply their way; ``close()`` is idempotent and a closed client
    refuses calls.
    """

    def __init__(self, name: str, *, timeout: float = DEFAULT_TIMEOUT,
                 runtime_dir: str = DEFAULT_RUNTIME_DIR) -> None:  # fmt: skip
        self.url = rpc_url(name, runtime_dir)
        self.timeout = timeout
        self._closed = False

    def _begin(self, action: str, data: bytes | str,
               timeout: float | None) -> tuple[list[bytes], float]:  # fmt: skip
        """The request's frames and its deadline in seconds; raises if it cannot go."""
        if self._closed:
            raise CommError(f"{type(self).__name__} of {self.url} is closed")
        if not endpoint_exists(self.url):
            self._forget_sockets()
            raise RpcUnavailable(f"no RPC service at {self.url}")
        return wire.request_frames(action, data), self.timeout if timeout is None else timeout

    def _timed_out(self, action: str, seconds: float) -> RpcTimeout:
        return RpcTimeout(f"{self.url} did not answer {action!r} within {seconds:.3g}s")

    def _read(self, reply: bytes) -> bytes:
        problem = wire.error_text(reply)
        if problem is not None:
            raise RpcRemoteError(f"{self.url} failed on {problem}")
        return reply

    def _forget_sockets(self) -> None:
        """Close idle sockets (the service went away: the next call connects afresh)."""

    def close(self) -> None:
        self._closed = True
        self._forget_sockets()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["DEFAULT_TIMEOUT", "RpcClientBase", "RpcDispatcher", "RpcHandler", "answer"]
