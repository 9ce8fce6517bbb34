"""One TCP client connection of the unit manager (spec 1 §3.3).

A session has a connection id ``c`` and a PULL socket bound at ``zmq_s_format % c``; units
PUSH their answers there (to ``zmq_c_format % c``, the ``zmq_com`` of its requests) and the
session writes them to the TCP stream unchanged (a missing final ``\\n`` is added).

Input: bytes -> :class:`~edgellm.protocol.framing.JsonStreamFramer` -> a backlog -> one
message at a time into :class:`~edgellm.manager.dispatch.Dispatcher`. Messages are handled
in order: while one waits for a unit's RPC reply the following ones wait, so a client's
``setup`` always reaches the unit before its next request. At most ``MAX_PER_TURN``
messages are handled per event loop turn, so one client flooding the manager (even with
junk, each line of which is answered) cannot stall the other sessions.

Output: the PULL socket's fd is watched by the event loop; every readable event drains it
without blocking and writes everything in one ``transport.write``. With ``answer_gap_ms``
set, answers are written one at a time, that far apart (for clients that read one message
per ``recv()``); the queue of paced answers counts as a full send buffer beyond
``MAX_PACED``.

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
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from edgellm.comm.urls import remove_ipc_file
from edgellm.manager.pending import Pending, PendingTable
from edgellm.manager.units import bind_socket
from edgellm.protocol.envelope import encode_error
from edgellm.protocol.errors import ErrorCode
from edgellm.protocol.framing import Frame, FramingError, JsonStreamFramer

if TYPE_CHECKING:
    from edgellm.manager.server import UnitManager

log = logging.getLogger(__name__)

# Plain ints: zmq's enum flags cost microseconds per operation on the hot path.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)

MAX_BACKLOG = 256
"""Queued input messages per session before reading from the client pauses."""

MAX_PER_TURN = 64
"""Messages of one session handled per event loop turn before the others get theirs."""

MAX_PACED = 1024
"""Answers waiting for their turn (``answer_gap_ms``) before the session stops making more."""


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
    """asyncio protocol of one client connection; created by the manager's TCP server."""

    def __init__(self, manager: "UnitManager"):
        self.manager = manager
        self.config = manager.config
        self.loop = manager.loop
        self.connection_id = -1
        self.client_url = ""
        self.transport: asyncio.Transport | None = None
        self.framer = JsonStreamFramer(self.config.max_message_bytes)
        self.pending = PendingTable(self.loop, self.config.request_timeout, self._on_expired)
        self._pull: zmq.Socket | None = None
        self._pull_url = ""
        self._pull_fd: int | None = None
        self._reading_pull = False
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
            self.connection_id = self.manager.connection_ids.take()
            self._pull_url = self.config.session_url(self.connection_id)
            self.client_url = self.config.client_url(self.connection_id)
            pull = self.manager.zmq_context.socket(zmq.PULL)
            pull.linger = 0
            try:
                bind_socket(pull, self._pull_url, self.config)
            except BaseException:
                pull.close(linger=0)
                raise
        except Exception as exc:
            log.error("cannot open a session: %s", exc)
            self._pull_url = ""
            self.close()
            return
        self._pull = pull
        self._pull_fd = pull.FD
        self.manager.sessions.add(self)
        self._watch_pull(True)
        transport.set_write_buffer_limits(high=1 << 20)
        log.debug("session %d opened (%s)", self.connection_id, self._pull_url)

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
        if self._pull is not None:
            self._watch_pull(False)
            self._pull.close(linger=0)
            self._pull = None
        if self._pull_url:
            remove_ipc_file(self._pull_url)
        if self.connection_id >= 0:
            self.manager.connection_ids.give_back(self.connection_id)
        self.manager.sessions.discard(self)
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
            self.send(encode_error(ErrorCode.JSON_FORMAT, message=f"json format error: {item.reason}"))
            return
        call = self.manager.dispatcher.handle(self, item)
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
            self._watch_pull(False)
            self._update_reading()
        elif not self._closed:
            self._watch_pull(True)
            if not self._drain_scheduled:
                self._drain()

    def _watch_pull(self, on: bool) -> None:
        if self._pull_fd is None or on == self._reading_pull:
            return
        self._reading_pull = on
        if on:
            self.loop.add_reader(self._pull_fd, self._on_pull_readable)
            self._on_pull_readable()  # messages may have queued while not watched
        else:
            self.loop.remove_reader(self._pull_fd)

    def pause_writing(self) -> None:
        self._transport_blocked = True
        self._set_write_blocked()

    def resume_writing(self) -> None:
        self._transport_blocked = False
        self._set_write_blocked()

    def _on_pull_readable(self) -> None:
        pull = self._pull
        if pull is None:
            return
        out: list[bytes] = []
        answered = self.pending.answered
        getsockopt = pull.getsockopt
        for _ in range(1000):  # bounded, so one busy session cannot starve the loop
            # Asking first is cheaper than the zmq.Again exception that ends every drain.
            try:
                if not getsockopt(_EVENTS) & _POLLIN:
                    break
                msg = pull.recv(_NOBLOCK)
            except zmq.ZMQError:
                return
            try:
                answer = _answer_decoder.decode(msg)
            except (msgspec.DecodeError, ValueError, RecursionError):
                answer = None
            if answer is not None and not answered(answer.request_id, is_terminal(answer), answer):
                continue  # a late piece of a request already answered with an error
            out.append(msg if msg.endswith(b"\n") else msg + b"\n")
        else:
            self.loop.call_soon(self._on_pull_readable)
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
        self.send(encode_error(code, p.request_id, p.work_id, f"{code.message}: {text}"))
