"""One task's sockets, owned by one worker thread (upstream's ``llm_channel_obj``).

A :class:`TaskChannel` runs a thread that owns every socket of its task:

- a PUB bound at the task's output url (downstream units subscribe to it);
- SUBs on its inputs: ``""`` = its own inference url (client requests published by the
  unit manager), or another task's work id whose output url the unit looked up;
- PUSH sockets to clients (an :class:`~edgellm.unit.outbox.Outbox`).

Messages from the SUBs are handed to ``on_message(source, raw)`` on that thread, so the
inference hot path (receive, handle, publish, push) never crosses a thread. Any other
thread reaches the worker through a mailbox: a deque plus an ``eventfd`` the worker polls
beside its sockets (:meth:`call_soon`, :meth:`submit`); sockets are never shared.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import zmq

from edgellm.comm.urls import bind, ipc_path
from edgellm.unit.outbox import Outbox

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
DRAIN_BATCH = 64
"""Messages read from one SUB before the worker looks at its other sockets (fairness)."""

RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000


class TaskChannel:
    """The worker thread and sockets of one task.

    ``start()`` binds the PUB (raising if that fails); ``stop()`` is idempotent, joins the
    worker (up to a timeout) and removes the PUB's ipc file. Methods marked *worker only*
    must run on the worker (handlers do); the rest are thread-safe.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        work_id: str,
        output_url: str,
        *,
        dir_mode: int = 0o700,
    ):
        self.work_id = work_id
        self.output_url = output_url
        self._ctx = ctx
        self._on_message: MessageHandler | None = None
        self._dir_mode = dir_mode
        self._mailbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._mailbox_closed = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._running = False
        self._stop_requested = False
        # Worker-owned state (touched only on the worker thread).
        self._pub: zmq.Socket | None = None
        self._bound_file: tuple[int, int] | None = None
        self._outbox: Outbox | None = None
        self._poller = zmq.Poller()
        self._subs: dict[str, zmq.Socket] = {}
        self._sources: dict[zmq.Socket, str] = {}

    # -- lifecycle -------------------------------------------------------------------

    def start(self, on_message: MessageHandler, timeout: float = 5.0) -> "TaskChannel":
        """Start the worker; ``on_message(source, raw)`` will get every input message."""
        if self._thread is not None:
            raise RuntimeError(f"channel {self.work_id} already started")
        self._on_message = on_message
        self._thread = threading.Thread(
            target=self._run, name=f"task:{self.work_id}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"channel {self.work_id} did not start")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the worker after what it is doing; True if it ended within ``timeout``."""
        if not self._stop_requested:
            self._stop_requested = True
            self.call_soon(self._halt)
        if self._thread is None:
            self._close_mailbox()
            return True
        if self._thread is threading.current_thread():
            return True  # stopping from a handler: the loop ends when the handler returns
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- mailbox (any thread) ------------------------------------------------------------

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the worker, after what is queued; False once stopped."""
        with self._wake_lock:
            if self._mailbox_closed:
                return False
            self._mailbox.append((fn, args))
            os.eventfd_write(self._wake_fd, 1)
        return True

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """As :meth:`call_soon`, with a future for the result; the future is cancelled
        if the channel stops before the call runs."""
        call = _Call(fn, args)
        if not self.call_soon(call):
            call.future.cancel()
        return call.future

    def emit(self, payload: bytes, push_url: str | None) -> None:
        """Publish ``payload`` on the output url and, if ``push_url``, push it to that
        client. From another thread the send is handed to the worker."""
        if self._thread is threading.current_thread():
            self._emit(payload, push_url)
        else:
            self.call_soon(self._emit, payload, push_url)

    def push(self, url: str, payload: bytes) -> None:
        """Push ``payload`` to one client only (replies and errors are not published)."""
        if self._thread is threading.current_thread():
            self._push(url, payload)
        else:
            self.call_soon(self._push, url, payload)

    # -- worker only ---------------------------------------------------------------------

    def _emit(self, payload: bytes, push_url: str | None) -> None:
        if self._pub is None or self._stop_requested:
            return  # the task was exited: what a late handler still produces goes nowhere
        self._pub.send(payload)
        if push_url:
            self._push(push_url, payload)

    def _push(self, url: str, payload: bytes) -> None:
        if self._outbox is not None:
            self._outbox.send(url, payload)

    def subscribe(self, inputs: dict[str, str], timeout: float) -> list[str]:
        """*Worker only.* SUB to each ``source -> url`` (replacing an existing SUB of that
        source) and wait up to ``timeout`` until every one has completed its ZeroMQ
        handshake, so a message published right after is not lost to a slow join.
        Returns the sources still not connected when the time ran out; raises
        ``zmq.ZMQError`` for an unusable url (the SUBs made so far stay)."""
        monitors: dict[zmq.Socket, str] = {}
        try:
            for source, url in inputs.items():
                self.unsubscribe(source)
                sock = self._ctx.socket(zmq.SUB)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
                sock.setsockopt(zmq.SUBSCRIBE, b"")
                monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                try:
                    sock.connect(url)
                except zmq.ZMQError:
                    sock.disable_monitor()
                    monitor.close(linger=0)
                    sock.close(linger=0)
                    raise
                monitors[monitor] = source
                self._subs[source] = sock
                self._sources[sock] = source
                self._poller.register(sock, zmq.POLLIN)
            return self._await_handshakes(monitors, timeout)
        finally:
            for monitor, source in monitors.items():
                sub = self._subs.get(source)
                if sub is not None:
                    sub.disable_monitor()
                monitor.close(linger=0)

    @staticmethod
    def _await_handshakes(monitors: dict[zmq.Socket, str], timeout: float) -> list[str]:
        pending = dict(monitors)
        deadline = time.monotonic() + timeout
        waiter = zmq.Poller()
        for monitor in pending:
            waiter.register(monitor, zmq.POLLIN)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for monitor, _ in waiter.poll(remaining * 1000):
                monitor.recv_multipart()
                waiter.unregister(monitor)
                pending.pop(monitor, None)
        return sorted(pending.values())

    def unsubscribe(self, source: str) -> bool:
        """*Worker only.* Close the SUB of ``source``; False if there was none."""
        sock = self._subs.pop(source, None)
        if sock is None:
            return False
        self._sources.pop(sock, None)
        self._poller.unregister(sock)
        sock.close(linger=0)
        return True

    def _halt(self) -> None:
        self._running = False

    def _run(self) -> None:
        try:
            pub = self._ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            try:
                bind(pub, self.output_url, self._dir_mode)
                self._bound_file = _file_identity(self.output_url)
            except BaseException:
                pub.close(linger=0)
                raise
        except BaseException as exc:
            self._error = exc
            self._close_mailbox()
            self._started.set()
            return
        self._pub = pub
        self._outbox = Outbox(self._ctx)
        self._poller.register(self._wake_fd, zmq.POLLIN)
        self._running = True
        self._started.set()
        try:
            self._loop()
        finally:
            self._close_mailbox()
            for source in list(self._subs):
                self.unsubscribe(source)
            self._outbox.close()
            pub.close(linger=0)
            self._pub = None
            self._remove_own_file()

    def _remove_own_file(self) -> None:
        """Remove the output's ipc file unless another task has bound the same url since
        (a unit manager that restarted may hand the url out again)."""
        if self._bound_file is not None and _file_identity(self.output_url) == self._bound_file:
            path = ipc_path(self.output_url)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _loop(self) -> None:
        poll = self._poller.poll
        wake_fd = self._wake_fd
        sources = self._sources
        on_message = self._on_message
        while self._running:
            for item, _ in poll():
                if item == wake_fd:
                    self._drain_mailbox()
                    if not self._running:
                        return
                    continue
                source = sources.get(item)
                if source is None:
                    continue  # unsubscribed by an earlier handler of this round
                for _ in range(DRAIN_BATCH):
                    try:
                        raw = item.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        on_message(source, raw)
                    except Exception:  # a handler bug must not kill the task
                        log.exception("task %s: handler failed", self.work_id)
                    if source not in self._subs:
                        break

    def _drain_mailbox(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        mailbox = self._mailbox
        while mailbox:
            fn, args = mailbox.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("task %s: queued call %r failed", self.work_id, fn)

    def _close_mailbox(self) -> None:
        with self._wake_lock:
            if self._mailbox_closed:
                return
            self._mailbox_closed = True
            os.close(self._wake_fd)
        # What was still queued will never run: release anyone waiting on it.
        while self._mailbox:
            fn, _ = self._mailbox.popleft()
            if isinstance(fn, _Call):
                fn.future.cancel()

    def __repr__(self) -> str:
        return f"<TaskChannel {self.work_id} {self.output_url}>"


def _file_identity(url: str) -> tuple[int, int] | None:
    """(device, inode) of an ``ipc://`` endpoint's file; None if absent or not ipc."""
    path = ipc_path(url)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Call:
    """A queued call whose outcome lands in a future."""

    __slots__ = ("fn", "args", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.fn = fn
        self.args = args
        self.future: Future = Future()

    def __call__(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn(*self.args))
        except BaseException as exc:  # handed to the waiter, not lost
            self.future.set_exception(exc)
