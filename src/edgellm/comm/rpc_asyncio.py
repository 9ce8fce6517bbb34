"""RPC on an asyncio event loop (the unit manager's): a service and a client whose sockets
the loop watches itself (:mod:`edgellm.comm.aio`); no thread, no second context."""

from __future__ import annotations

import asyncio

from edgellm.comm.aio import Watch, wait_readable
from edgellm.comm.endpoints import Req, Router
from edgellm.comm.errors import CommError
from edgellm.comm.rpc import DEFAULT_TIMEOUT, RpcClientBase, RpcDispatcher, answer
from edgellm.comm.urls import DEFAULT_RUNTIME_DIR, rpc_url

MAX_PER_TURN = 64
"""Requests served per event loop turn before the loop's other work gets its turn."""


class AsyncRpcServer:
    """Serves a dispatcher at ``rpc.<name>`` on ``loop``; handlers run inline in the loop,
    so they must be quick. ``start()`` binds (raising ``EndpointError``); ``close()`` is
    idempotent and removes the ipc file."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, dispatcher: RpcDispatcher,
                 *, runtime_dir: str = DEFAULT_RUNTIME_DIR,
                 dir_mode: int = 0o700) -> None:  # fmt: skip
        self.url = rpc_url(name, runtime_dir)
        self.dispatcher = dispatcher
        self._loop = loop
        self._dir_mode = dir_mode
        self._router: Router | None = None
        self._watch: Watch | None = None

    def start(self) -> "AsyncRpcServer":
        if self._router is not None:
            raise RuntimeError(f"RPC service {self.url} already started")
        self._router = Router(self.url, dir_mode=self._dir_mode)
        self._watch = Watch(self._loop, self._router, self._serve)
        self._watch.resume()
        return self

    def _serve(self) -> None:
        router = self._router
        if router is None or router.closed:
            return
        served = 0
        while served < MAX_PER_TURN:
            batch = router.drain_multipart(MAX_PER_TURN - served)
            if not batch:
                return  # drained after the last send: no edge can have been missed
            for frames in batch:
                reply = answer(frames, self.dispatcher)
                if reply is not None:
                    router.send_multipart(reply)
            served += len(batch)
        self._loop.call_soon(self._serve)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()


class AsyncRpcClient(RpcClientBase):
    """asyncio client of one RPC service. Concurrent calls each borrow a REQ socket from a
    small pool (REQ allows one outstanding request), so one slow call does not queue the
    others behind it. Use from one event loop. ``close()`` ends the calls in flight with
    ``CommError``."""

    def __init__(self, name: str, *, timeout: float = DEFAULT_TIMEOUT,
                 runtime_dir: str = DEFAULT_RUNTIME_DIR, max_idle: int = 8) -> None:  # fmt: skip
        super().__init__(name, timeout=timeout, runtime_dir=runtime_dir)
        self._idle: list[Req] = []
        self._max_idle = max_idle
        self._waiting: set[asyncio.Future] = set()

    async def call(self, action: str, data: bytes | str = b"",
                   timeout: float | None = None) -> bytes:  # fmt: skip
        """As :meth:`edgellm.comm.rpc_thread.RpcClient.call`, without blocking the loop."""
        frames, seconds = self._begin(action, data, timeout)
        req = self._idle.pop() if self._idle else Req(self.url)
        try:
            loop = asyncio.get_running_loop()
            if not (req.send_multipart(frames)
                    and await wait_readable(loop, req, seconds, self._waiting)):  # fmt: skip
                raise self._timed_out(action, seconds)
            reply = req.drain(1)
            if not reply:
                raise self._timed_out(action, seconds)
        except BaseException:
            req.close()
            raise
        if self._closed or len(self._idle) >= self._max_idle:
            req.close()
        else:
            self._idle.append(req)
        return self._read(reply[0])

    def _forget_sockets(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def close(self) -> None:
        super().close()
        for waiting in list(self._waiting):
            if not waiting.done():
                waiting.set_exception(CommError(f"client of {self.url} closed"))


__all__ = ["AsyncRpcClient", "AsyncRpcServer"]
