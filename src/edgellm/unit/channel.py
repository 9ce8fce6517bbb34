"""One task's sockets, owned by one socket thread (upstream's ``llm_channel_obj``).

A :class:`TaskChannel` is a :class:`~edgellm.comm.loop.SocketThread` (the task's
*worker*) that owns every socket of its task:

- a PUB bound at the task's output url (downstream units subscribe to it);
- SUBs on its inputs: ``""`` = its own inference url (client requests published by the
  unit manager), or another task's work id whose output url the unit looked up;
- PUSH endpoints to clients (an :class:`~edgellm.comm.outbox.Outbox`).

Messages from the SUBs are handed to ``on_message(source, raw)`` on the worker, so the
inference hot path (receive, handle, publish, push) never crosses a thread. Any other
thread reaches the worker with :meth:`call_soon` / :meth:`submit`; sockets are never
shared.
"""

from __future__ import annotations

import logging
from typing import Callable

from edgellm.comm.endpoints import LinkEvent, Monitor, Pub, Sub, wait_for_events
from edgellm.comm.loop import SocketThread
from edgellm.comm.outbox import Outbox

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
DRAIN_BATCH = 64
"""Messages read from one SUB before the worker looks at its other sockets (fairness)."""


class TaskChannel(SocketThread):
    """The worker thread and sockets of one task.

    ``start(on_message)`` binds the PUB (raising ``EndpointError`` if that fails);
    ``stop()`` is idempotent, joins the worker (up to a timeout) and removes the PUB's
    ipc file. Methods marked *worker only* must run on the worker (handlers do); the rest
    are thread-safe.
    """

    def __init__(self, work_id: str, output_url: str, *, dir_mode: int = 0o700) -> None:
        super().__init__(f"task:{work_id}")
        self.work_id = work_id
        self.output_url = output_url
        self._dir_mode = dir_mode
        self._on_message: MessageHandler | None = None
        # Worker-owned (touched only on the worker):
        self._pub: Pub | None = None
        self._outbox: Outbox | None = None
        self._subs: dict[str, Sub] = {}

    def start(self, on_message: MessageHandler, timeout: float = 5.0) -> "TaskChannel":
        """Start the worker; ``on_message(source, raw)`` will get every input message."""
        self._on_message = on_message
        return super().start(timeout)

    def setup(self) -> None:
        self._pub = self.open(Pub, self.output_url, dir_mode=self._dir_mode)
        self._outbox = Outbox()

    def teardown(self) -> None:
        if self._outbox is not None:
            self._outbox.close()
        self._pub = None  # closed with the thread's other endpoints

    # -- outputs (any thread) --------------------------------------------------------------

    def emit(self, payload: bytes, push_url: str | None) -> None:
        """Publish ``payload`` on the output url and, if ``push_url``, push it to that
        client. From another thread the send is handed to the worker."""
        if self.in_thread:
            self._emit(payload, push_url)
        else:
            self.call_soon(self._emit, payload, push_url)

    def push(self, url: str, payload: bytes) -> None:
        """Push ``payload`` to one client only (replies and errors are not published)."""
        if self.in_thread:
            self._push(url, payload)
        else:
            self.call_soon(self._push, url, payload)

    def _emit(self, payload: bytes, push_url: str | None) -> None:
        if self._pub is None or self.stopping:
            return  # the task was exited: what a late handler still produces goes nowhere
        self._pub.send(payload)
        if push_url:
            self._push(push_url, payload)

    def _push(self, url: str, payload: bytes) -> None:
        if self._outbox is not None:
            self._outbox.send(url, payload)

    # -- inputs (worker only) --------------------------------------------------------------

    def subscribe(self, inputs: dict[str, str], timeout: float) -> list[str]:
        """*Worker only.* SUB to each ``source -> url`` (replacing an existing SUB of that
        source) and wait up to ``timeout`` until every one has completed its ZeroMQ
        handshake, so a message published right after is not lost to a slow join.
        Returns the sources still not connected when the time ran out; raises
        ``EndpointError`` for an unusable url (the SUBs made so far stay)."""
        monitors: dict[Monitor, str] = {}
        subs: list[Sub] = []
        try:
            for source, url in inputs.items():
                self.unsubscribe(source)
                sub = self.open(Sub, url, monitor=LinkEvent.HANDSHAKE_SUCCEEDED)
                subs.append(sub)
                monitors[sub.link_monitor] = source  # type: ignore[index]
                self._subs[source] = sub
                self.add_reader(sub, lambda source=source, sub=sub: self._read(source, sub))
            return wait_for_events(monitors, timeout)
        finally:
            for sub in subs:
                sub.unmonitor()

    def unsubscribe(self, source: str) -> bool:
        """*Worker only.* Close the SUB of ``source``; False if there was none."""
        sub = self._subs.pop(source, None)
        if sub is None:
            return False
        self.close_endpoint(sub)
        return True

    def _read(self, source: str, sub: Sub) -> None:
        on_message = self._on_message
        for raw in sub.drain(DRAIN_BATCH):
            try:
                on_message(source, raw)  # type: ignore[misc]
            except Exception:  # one bad message costs itself, not the task
                log.exception("task %s: handler failed", self.work_id)
            if self._subs.get(source) is not sub:
                return  # unsubscribed (or replaced) by that handler: the rest goes with it

    def __repr__(self) -> str:
        return f"<TaskChannel {self.work_id} {self.output_url}>"


__all__ = ["TaskChannel"]
