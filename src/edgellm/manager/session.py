"""One TCP client connection of the unit manager (spec 1 §3.3).

A session has a connection id ``c`` and a PULL socket bound at ``zmq_s_format % c``; units
PUSH their answers there (to ``zmq_c_format % c``, the ``zmq_com`` of its requests) and the
session writes them to the TCP stream unchanged (a missing final ``\\n`` is added).

Input: bytes -> :class:`~edgellm.protocol.framing.JsonStreamFramer` -> a backlog -> one
message at a time into ``handle`` (the :class:`~edgellm.manager.dispatch.Dispatcher`'s).
Messages are handled in order: while one waits for a unit's RPC reply the following ones
wait, so a client's ``setup`` always reaches the unit before its next request. At most
``MAX_PER_TURN`` messages are handled per event loop turn, so one client flooding the
manager (even with junk, each line of which is answered) cannot stall the other sessions.

Output: the event loop watches the PULL (:class:`edgellm.comm.aio.Watch`); every readable
event drains it without blocking and writes everything in one ``transport.write``. With
``answer_gap_ms`` set, answers are written one at a time, that far apart (for clients that
read one message per ``recv()``); the queue of paced answers counts as a full send buffer
beyond ``MAX_PACED``.

Flow control, so that no client can grow the manager's memory:

- while the TCP send buffer is over its high-water mark (the client does not read), the
  PULL is not read (ZeroMQ queues, then units' PUSH sends time out), the backlog is not
  handled (handling makes answers) and the client is not read either: its own sends block,
  as with any flow-controlled server;
- while the backlog is long (a unit call is slow), the client is not read.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Awaitable, Callable

import msgspec

from edgellm.comm.aio import Watch
from edgellm.comm.endpoints import Pull
from edgellm.comm.errors import EndpointError
from edgellm.manager.allocator import ConnectionIds
from edgellm.manager.config import ManagerConfig
from edgellm.manager.pending import Pending, PendingTable
from edgellm.protocol.envelope import NO_REQUEST_ID, SYS_WORK_ID, encode_error
from edgellm.protocol.errors import ErrorCode
from edgellm.protocol.framing import Frame, FramingError, JsonStreamFramer

log = logging.getLogger(__name__)

MAX_BACKLOG = 256
"""Queued input messages per session before reading from the client pauses."""

MAX_PER_TURN = 64
"""Messages of one session handled per event loop turn before the others get theirs."""

MAX_PACED = 1024
"""Answers waiting for their turn (``answer_gap_ms``) before the session stops making more."""

PULL_DRAIN = 1000
"""Answers read from the PULL per event loop turn, so one busy session cannot starve the loop."""

Handler = Callable[["Session", Frame], "Awaitable[None] | None"]


class _AnswerView(msgspec.Struct):
    """The fields of a unit's answer that decide whether it ends its request."""

    request_id: Any = None
    work_id: Any = None
    error: Any = None
    data: Any = None


_answer_decoder = msgspec.json.Decoder(_AnswerView)


def is_terminal(answer: _AnswerView) -> bool:
    """Whether this answer ends its request (see :mod:`edgellm.manager.pending`)."""
    error = answer.error
    if type(error) is dict and error.get("code", 0) != 0:
        return True
    data = answer.data
    if type(data) is not dict or "finish" not in data:
        return True
    return bool(data["finish"])


class Session(asyncio.Protocol):
    """asyncio protocol of one client connection; created by the manager's TCP server.

    Collaborators: ``ids`` hands out connection ids; ``handle(session, frame)`` dispatches
    one request (a coroutine when it must wait for a unit); ``live`` is the set of open
    sessions, which this one joins and leaves; ``clock`` gives ``created`` (unix seconds).
    """

    def __init__(self, config: ManagerConfig, loop: asyncio.AbstractEventLoop,
                 ids: ConnectionIds, handle: Handler, live: set["Session"],
                 clock: Callable[[], float]) -> None:  # fmt: skip
        self.config = config
        self.loop = loop
        self._ids = ids
        self._handle_frame = handle
        self._live = live
        self._clock = clock
        self.connection_id = -1
        self.client_url = ""
        self.transport: asyncio.Transport | None = None
        self.framer = JsonStreamFramer(self.config.max_message_bytes)
        self.pending = PendingTable(self.loop, self.config.request_timeout, self._on_expired)
        self._pull: Pull | None = None
        self._watch: Watch | None = None
        self._backlog: deque[Frame | FramingError] = deque()
        self.call: asyncio.Task | None = None  # the unit RPC the next messages wait for
        self._drain_scheduled = False
        self._write_blocked = False  # the client does not read: its send buffer is full
        self._transport_blocked = False
        self._gap = self.config.answer_gap_ms / 1000.0
        self._paced: deque[bytes] = deque()
        self._pace_timer: asyncio.TimerHandle | None = None
        self._next_write_at = 0.0
        self._paused_reading = False
        self._closed = False

    # -- connection lifecycle -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        try:
            self.connection_id = self._ids.take()
            self.client_url = self.config.client_url(self.connection_id)
            pull = Pull(self.config.session_url(self.connection_id), dir_mode=self.config.ipc_mode)
        except (RuntimeError, OSError) as exc:  # no connection id left; cannot bind
            log.error("cannot open a session: %s", exc)
            self.close()
            return
        self._pull = pull
        self._watch = Watch(self.loop, pull, self._on_pull_readable)
        self._live.add(self)
        self._watch.resume()
        transport.set_write_buffer_limits(high=1 << 20)
        log.debug("session %d opened (%s)", self.connection_id, pull.url)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and the PULL, remove its file; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.call is not None:
            self.call.cancel()
        if self._pace_timer is not None:
            self._pace_timer.cancel()
        self._paced.clear()
        self.pending.close()
        self._backlog.clear()
        if self._watch is not None:
            self._watch.close()  # the PULL and its file too
            self._pull = None
        if self.connection_id >= 0:
            self._ids.give_back(self.connection_id)
        self._live.discard(self)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        log.debug("session %d closed", self.connection_id)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- client -> units ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._backlog.extend(self.framer.feed(data))
        if self._drain_scheduled:
            self._update_reading()
        else:
            self._drain()

    def _drain(self) -> None:
        """Handle queued messages in order, ``MAX_PER_TURN`` at a time, until one waits for
        a unit's RPC reply or the client stops reading its answers."""
        self._drain_scheduled = False
        if self._closed:
            return
        backlog = self._backlog
        for _ in range(MAX_PER_TURN):
            if not backlog or self.call is not None or self._write_blocked:
                break
            self._handle(backlog.popleft())
        else:
            if backlog and self.call is None and not self._write_blocked:
                self._drain_scheduled = True
                self.loop.call_soon(self._drain)
        self._update_reading()

    def _handle(self, item: Frame | FramingError) -> None:
        """Handle one message; a unit RPC it starts becomes :attr:`call`."""
        if type(item) is FramingError:
            self.send(self._error(ErrorCode.JSON_FORMAT, message=f"json format error: {item.reason}"))
            return
        call = self._handle_frame(self, item)
        if call is not None:
            self.call = self.loop.create_task(call)
            self.call.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task) -> None:
        self.call = None
        if not task.cancelled() and task.exception() is not None:
            log.error("session %d: request failed", self.connection_id, exc_info=task.exception())
        if not self._drain_scheduled:
            self._drain()

    def _update_reading(self) -> None:
        """Pause reading from the client while it does not read or the backlog is long;
        resume when neither holds (the backlog with hysteresis)."""
        if self.transport is None or self._closed:
            return
        queued = len(self._backlog)
        if self._paused_reading:
            pause = self._write_blocked or queued >= MAX_BACKLOG // 2
        else:
            pause = self._write_blocked or queued >= MAX_BACKLOG
        if pause != self._paused_reading:
            self._paused_reading = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # -- units -> client ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write one encoded envelope to the client (paced, with ``answer_gap_ms``)."""
        if self.transport is None or self._closed:
            return
        if not self._gap:
            self.transport.write(data)
            return
        self._paced.append(data)
        if self._pace_timer is None:
            self._write_paced()

    def _write_paced(self) -> None:
        self._pace_timer = None
        if self._closed or not self._paced:
            return
        now = self.loop.time()
        if now >= self._next_write_at:
            self.transport.write(self._paced.popleft())  # type: ignore[union-attr]
            self._next_write_at = now + self._gap
        if self._paced:
            self._pace_timer = self.loop.call_at(self._next_write_at, self._write_paced)
        self._set_write_blocked()

    def _set_write_blocked(self) -> None:
        """Writing counts as blocked while the transport's buffer is full or, when pacing,
        while too many answers wait for their turn; unblocking resumes the input."""
        blocked = self._transport_blocked or len(self._paced) >= MAX_PACED
        if blocked == self._write_blocked:
            return
        self._write_blocked = blocked
        if blocked:
            if self._watch is not None:
                self._watch.pause()
            self._update_reading()
        elif not self._closed:
            if self._watch is not None:
                self._watch.resume()  # answers may have queued while not watched
            if not self._drain_scheduled:
                self._drain()

    def pause_writing(self) -> None:
        self._transport_blocked = True
        self._set_write_blocked()

    def resume_writing(self) -> None:
        self._transport_blocked = False
        self._set_write_blocked()

    def _on_pull_readable(self) -> None:
        pull = self._pull
        if pull is None or self._watch is None or not self._watch.active:
            return
        try:
            messages = pull.drain(PULL_DRAIN)
        except EndpointError as exc:
            log.error("session %d: its PULL failed: %s", self.connection_id, exc)
            return
        if len(messages) == PULL_DRAIN:
            self.loop.call_soon(self._on_pull_readable)  # the rest, after the others' turn
        out: list[bytes] = []
        answered = self.pending.answered
        for msg in messages:
            try:
                answer = _answer_decoder.decode(msg)
            except (msgspec.DecodeError, ValueError, RecursionError):
                answer = None
            if answer is not None and not answered(answer.request_id, is_terminal(answer), answer):
                continue  # a late piece of a request already answered with an error
            out.append(msg if msg.endswith(b"\n") else msg + b"\n")
        if self._gap:
            for msg in out:
                self.send(msg)
        elif out:
            self.send(out[0] if len(out) == 1 else b"".join(out))

    def _on_expired(self, p: Pending, reason: str) -> None:
        if reason == "held":
            code, text = ErrorCode.INFERENCE_PUSH, f"no task of {p.work_id} is subscribed"
        elif reason == "detached":
            code, text = ErrorCode.UNIT_CALL, f"{p.work_id} went away before answering"
        else:
            code = ErrorCode.UNIT_CALL
            text = f"no answer from {p.work_id} within {p.timeout:g}s"
        log.warning("session %d request %r: %s", self.connection_id, p.request_id, text)
        self.send(self._error(code, p.request_id, p.work_id, f"{code.message}: {text}"))

    def _error(self, code: ErrorCode, request_id: str = NO_REQUEST_ID, work_id: str = SYS_WORK_ID,
               message: str | None = None) -> bytes:  # fmt: skip
        return encode_error(code, request_id, work_id, message, created=int(self._clock()))
