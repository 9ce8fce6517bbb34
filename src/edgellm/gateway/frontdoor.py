"""An asyncio client of a unit manager's TCP front door (spec 1 §3.3), shared by many
requests at once.

One connection carries every request of the gateway to one box. Answers are told apart:

- a *stream* (an inference) owns its task's ``work_id`` while it runs (the gateway leases
  each task to one request at a time), so its pieces are the answers with that work id and
  the stream's request id;
- a *call* (setup, exit, pause, work, lsmode, stats, tokenize) has a request id of its own
  making (``gw.<random>.<n>``) and takes the one answer that carries it.

:meth:`FrontDoor.call` returns the answer envelope (raising :class:`FrontDoorError` on a
lost connection or timeout; an error *answer* is returned, the caller reads its code).
:meth:`FrontDoor.open_stream` returns a queue of envelopes; a lost connection puts
:data:`LOST` on every open stream. Writes are serialised by the event loop (one
``transport.write`` per message).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from typing import Any

import msgspec

from edgellm.protocol.framing import Frame, JsonStreamFramer

log = logging.getLogger(__name__)

LOST = object()
"""Put on a stream's queue when the connection is gone."""

_encode = msgspec.json.Encoder().encode
_READ = 1 << 16


class FrontDoorError(ConnectionError):
    """The connection failed, or no answer came in time."""


class FrontDoor:
    """One TCP connection to ``host:port`` (see the module docstring)."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 3.0):
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._calls: dict[str, asyncio.Future] = {}
        self._streams: dict[str, tuple[str, asyncio.Queue]] = {}  # work_id -> (request_id, q)
        self._ids = itertools.count()
        self._prefix = f"gw.{secrets.token_hex(4)}."  # unlike any client's X-Request-Id
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        """Connect unless connected; raises :class:`FrontDoorError`."""
        async with self._lock:
            if self.connected:
                return
            try:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, limit=_READ),
                    self.connect_timeout)  # fmt: skip
            except (OSError, TimeoutError) as exc:
                raise FrontDoorError(f"cannot reach {self.host}:{self.port}: {exc!r}") from None
            self._read_task = asyncio.get_running_loop().create_task(
                self._read_loop(self._reader), name=f"frontdoor:{self.host}:{self.port}")

    async def close(self) -> None:
        """Close the connection (open calls and streams fail); safe to call twice."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        if self._read_task is not None:
            self._read_task.cancel()
            try:
                await self._read_task
            except (asyncio.CancelledError, Exception):
                pass
            self._read_task = None
        self._fail_all()

    # -- requests ------------------------------------------------------------------------

    def next_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    async def call(self, action: str, work_id: str, data: Any = None, *, object_: str = "None",
                   timeout: float = 10.0) -> dict[str, Any]:  # fmt: skip
        """Send one request and return its answer envelope; raises :class:`FrontDoorError`."""
        await self.connect()
        request_id = self.next_id()
        future = asyncio.get_running_loop().create_future()
        self._calls[request_id] = future
        try:
            self._send({"request_id": request_id, "work_id": work_id, "action": action,
                        "object": object_, "data": data})  # fmt: skip
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise FrontDoorError(f"no answer to {action} on {work_id} within {timeout:g}s"
                                 ) from None
        finally:
            self._calls.pop(request_id, None)

    def open_stream(self, work_id: str, request_id: str) -> asyncio.Queue:
        """Route answers for ``(work_id, request_id)`` to a new queue (the caller then sends
        the request with :meth:`send`). Raises :class:`FrontDoorError` if not connected."""
        if not self.connected:
            raise FrontDoorError(f"not connected to {self.host}:{self.port}")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[work_id] = (request_id, queue)
        return queue

    def close_stream(self, work_id: str) -> None:
        self._streams.pop(work_id, None)

    def send(self, message: dict[str, Any]) -> None:
        """Write one request; raises :class:`FrontDoorError` if not connected."""
        self._send(message)

    def _send(self, message: dict[str, Any]) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise FrontDoorError(f"not connected to {self.host}:{self.port}")
        writer.write(_encode(message) + b"\n")

    # -- answers -------------------------------------------------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        framer = JsonStreamFramer()
        try:
            while True:
                chunk = await reader.read(_READ)
                if not chunk:
                    break
                for item in framer.feed(chunk):
                    if isinstance(item, Frame):
                        self._deliver(item.value)
                    else:
                        log.warning("%s:%d sent something unreadable: %s", self.host, self.port,
                                    item.reason)  # fmt: skip
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.info("connection to %s:%d lost: %r", self.host, self.port, exc)
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._fail_all()

    def _deliver(self, answer: dict[str, Any]) -> None:
        request_id = answer.get("request_id")
        stream = self._streams.get(answer.get("work_id"))  # type: ignore[arg-type]
        if stream is not None and stream[0] == request_id:
            stream[1].put_nowait(answer)
            return
        future = self._calls.get(request_id)  # type: ignore[arg-type]
        if future is not None and not future.done():
            future.set_result(answer)
            return
        log.debug("answer nobody waits for: %.200r", answer)

    def _fail_all(self) -> None:
        for future in self._calls.values():
            if not future.done():
                future.set_exception(FrontDoorError(f"connection to {self.host}:{self.port} lost"))
        self._calls.clear()
        streams, self._streams = self._streams, {}
        for _, queue in streams.values():
            queue.put_nowait(LOST)
