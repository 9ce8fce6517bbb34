"""Endpoints on an asyncio event loop: the adapter for daemons that keep every socket on
one loop (the unit manager), so nothing is shared between threads and nothing is locked.

The loop watches an endpoint's file descriptor (``loop.add_reader``). ZeroMQ signals that
descriptor on edges only, and any operation on the socket (a send too) may consume an
edge; so a reader drains what :meth:`Endpoint.has_input` says is there, and whoever sends
on a watched endpoint calls :meth:`Watch.poke` afterwards.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from edgellm.comm.endpoints import Endpoint


class Watch:
    """Calls ``on_readable()`` on ``loop`` whenever ``endpoint`` may have input, while
    :attr:`active`. ``on_readable`` drains (or reschedules itself for the rest)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: Endpoint,
                 on_readable: Callable[[], None]) -> None:  # fmt: skip
        self._loop = loop
        self._endpoint = endpoint
        self._fd = endpoint.fd
        self._on_readable = on_readable
        self.active = False

    def resume(self) -> None:
        """Watch; messages that queued while paused are handled now."""
        if self.active or self._endpoint.closed:
            return
        self.active = True
        self._loop.add_reader(self._fd, self._on_readable)
        if self._endpoint.has_input():
            self._on_readable()

    def pause(self) -> None:
        """Stop watching (messages queue in ZeroMQ meanwhile)."""
        if self.active:
            self.active = False
            self._loop.remove_reader(self._fd)

    def poke(self) -> None:
        """After a send on the endpoint: handle input whose edge the send consumed."""
        if self.active and self._endpoint.has_input():
            self._on_readable()

    def close(self) -> None:
        """Stop watching and close the endpoint; safe to call twice."""
        self.pause()
        self._endpoint.close()


async def wait_readable(loop: asyncio.AbstractEventLoop, endpoint: Endpoint, timeout: float,
                        waiters: set[asyncio.Future] | None = None) -> bool:  # fmt: skip
    """Wait until ``endpoint`` has input; False if ``timeout`` seconds pass first.

    While waiting, the future waited on is in ``waiters``: its owner may fail it (set an
    exception) to end the wait with that exception, e.g. when it closes.
    """
    if endpoint.has_input():
        return True
    ready = loop.create_future()
    if waiters is not None:
        waiters.add(ready)

    def check() -> None:
        if not ready.done() and endpoint.has_input():
            ready.set_result(None)

    fd = endpoint.fd
    loop.add_reader(fd, check)
    try:
        check()  # an edge may have passed between the first look and add_reader
        await asyncio.wait_for(ready, timeout)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        if waiters is not None:
            waiters.discard(ready)


__all__ = ["Watch", "wait_readable"]
