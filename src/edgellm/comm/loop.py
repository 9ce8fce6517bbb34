"""The socket thread: one thread that owns sockets, the one way the comm layer runs them.

A :class:`SocketThread` polls its endpoints and a wake-up pipe, runs callbacks when an
endpoint is readable, runs timers, and runs calls that other threads hand it. Its
sockets are made and used on it alone; other threads reach it only through
:meth:`~SocketThread.call_soon` / :meth:`~SocketThread.submit`.

Lifecycle::

    thread = MyThread("name")   # subclass: setup() opens endpoints, on_tick() optional
    thread.start(timeout=5.0)   # runs setup() on the thread; returns once it returned,
                                # raising what it raised, or TimeoutError
    thread.call_soon(fn, *args) # any thread: fn(*args) on the thread, in order
    thread.stop(timeout=5.0)    # calls queued before run first; then teardown(), every
                                # endpoint closed (linger 0); idempotent; True if ended
    with MyThread("name") as thread: ...

Waking: an ``os.pipe`` written once per batch of calls (a flag coalesces the writes). A
pipe, rather than an inproc PAIR socket, because any thread may write it without a lock
around a ZeroMQ socket, it costs one system call, and zmq's poller and asyncio both watch
it like any file descriptor.

A callback, timer or queued call that raises is logged with its traceback and the thread
goes on; ``on_error`` (a hook) hears of it too.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

import zmq

from edgellm.comm.endpoints import Endpoint, Monitor

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Endpoint)
Pollable = Endpoint | Monitor | int


class Timer:
    """A call scheduled on a socket thread; :meth:`cancel` it (safe twice)."""

    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when: float, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SocketThread:
    """A thread owning endpoints (see the module docstring).

    ``tick``: when set, :meth:`on_tick` runs at least that often (seconds), besides after
    every round of events. Methods marked *thread only* must run on the thread (in
    callbacks, timers, queued calls, :meth:`setup`); the others are thread-safe.
    """

    def __init__(self, name: str, *, tick: float | None = None) -> None:
        self.name = name
        self.__tick = tick
        self.__poller = zmq.Poller()
        self.__readers: dict[Any, Callable[[], None]] = {}
        self.__endpoints: list[Endpoint] = []
        self.__timers: list[tuple[float, int, Timer]] = []
        self.__timer_seq = itertools.count()
        self.__mailbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self.__lock = threading.Lock()
        self.__wake_r, self.__wake_w = os.pipe()
        os.set_blocking(self.__wake_r, False)
        os.set_blocking(self.__wake_w, False)
        self.__signalled = False
        self.__accepting = True  # the mailbox takes calls
        self.__running = False
        self.__state = "new"
        self.__started = threading.Event()
        self.__error: BaseException | None = None
        self.__thread = threading.Thread(target=self.__run, name=name, daemon=True)

    # -- hooks (run on the thread) ---------------------------------------------------------

    def setup(self) -> None:
        """Open endpoints and add readers; what it raises, :meth:`start` raises."""

    def teardown(self) -> None:
        """Last words before the endpoints close (e.g. send what is queued)."""

    def on_tick(self) -> None:
        """After every round of events, and every ``tick`` seconds when set."""

    def on_error(self, where: str, exc: BaseException) -> None:
        """A callback failed (already logged with its traceback)."""

    # -- lifecycle (any thread) ------------------------------------------------------------

    def start(self, timeout: float = 5.0):
        """Start the thread and run :meth:`setup` on it; not restartable."""
        with self.__lock:
            if self.__state != "new":
                raise RuntimeError(f"{self.name} already {self.__state}")
            self.__state = "running"
        self.__thread.start()
        if not self.__started.wait(timeout):
            self.stop(0)
            raise TimeoutError(f"{self.name} did not start within {timeout}s")
        if self.__error is not None:
            self.__thread.join(timeout)
            raise self.__error
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop after the calls queued so far; True once the thread has ended (called on
        the thread itself: True at once, and the loop ends after those calls)."""
        with self.__lock:
            state = self.__state
            if state == "new":
                self.__state = "stopped"
                self.__accepting = False
                self.__close_pipe()
                return True
            if state == "running":
                self.__state = "stopping"
                self.__post(self.halt, ())
                self.__accepting = False
        if self.__thread.ident is None or self.__thread is threading.current_thread():
            return True  # never started; or the loop ends when the current callback returns
        self.__thread.join(timeout)
        return not self.__thread.is_alive()

    def __enter__(self):
        return self.start() if self.__state == "new" else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        """The thread runs (it ends only when stopped)."""
        return self.__thread.is_alive()

    @property
    def stopping(self) -> bool:
        """Stop was asked for (or the thread ended): no more calls are taken."""
        return self.__state != "running"

    @property
    def in_thread(self) -> bool:
        return self.__thread is threading.current_thread()

    # -- the mailbox (any thread) ----------------------------------------------------------

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the thread after what is queued; False once stopping."""
        with self.__lock:
            if not self.__accepting:
                return False
            self.__post(fn, args)
        return True

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """As :meth:`call_soon`, with a future for the outcome; cancelled if the thread
        stops before the call runs."""
        call = _Call(fn, args)
        if not self.call_soon(call):
            call.future.cancel()
        return call.future

    def __post(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        # Under the lock. The flag is set before writing and cleared by the thread before it
        # drains, so a call appended while it is set is drained by that pass.
        self.__mailbox.append((fn, args))
        if not self.__signalled:
            self.__signalled = True
            try:
                os.write(self.__wake_w, b"\x01")
            except BlockingIOError:  # the pipe is full: the thread is due to wake anyway
                pass

    # -- endpoints, readers, timers (thread only) ------------------------------------------

    def open(self, kind: type[E], url: str, **options: Any) -> E:
        """An endpoint of this thread, closed when the thread ends."""
        endpoint = kind(url, **options)
        self.__endpoints.append(endpoint)
        return endpoint

    def close_endpoint(self, endpoint: Endpoint) -> None:
        """Stop reading ``endpoint`` (and its monitor) and close it now."""
        self.remove_reader(endpoint)
        if endpoint.link_monitor is not None:
            self.remove_reader(endpoint.link_monitor)
        endpoint.close()
        try:
            self.__endpoints.remove(endpoint)
        except ValueError:
            pass

    def add_reader(self, source: Pollable, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``source`` (an endpoint, monitor or fd) is
        readable; callbacks of one round run in the order sources were added."""
        key = _poll_key(source)
        if key not in self.__readers:
            self.__poller.register(key, zmq.POLLIN)
        self.__readers[key] = callback

    def remove_reader(self, source: Pollable) -> None:
        key = _poll_key(source)
        if self.__readers.pop(key, None) is not None:
            self.__poller.unregister(key)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Run ``fn(*args)`` in ``delay`` seconds (monotonic clock)."""
        timer = Timer(time.monotonic() + max(0.0, delay), fn, args)
        heapq.heappush(self.__timers, (timer.when, next(self.__timer_seq), timer))
        return timer

    def halt(self) -> None:
        """End the loop once the current callback returns (thread only; see :meth:`stop`)."""
        with self.__lock:
            self.__accepting = False
            if self.__state == "running":
                self.__state = "stopping"
        self.__running = False

    # -- the thread ------------------------------------------------------------------------

    def __run(self) -> None:
        try:
            self.add_reader(self.__wake_r, self.__drain_mailbox)
            self.setup()
        except BaseException as exc:  # reported to start()
            self.__error = exc
            self.__finish(teardown=False)
            self.__started.set()
            return
        self.__running = True
        self.__started.set()
        try:
            self.__loop()
        except Exception as exc:  # a bug in the loop itself: say so, then clean up
            log.exception("%s: socket thread failed", self.name)
            self.on_error("loop", exc)
        finally:
            self.__finish(teardown=True)

    def __loop(self) -> None:
        poll = self.__poller.poll
        readers = self.__readers
        timers = self.__timers
        while self.__running:
            if timers:
                wait = max(0.0, timers[0][0] - time.monotonic())
                if self.__tick is not None:
                    wait = min(wait, self.__tick)
                events = poll(wait * 1000)
            else:
                events = poll(None if self.__tick is None else self.__tick * 1000)
            for key, _ in events:
                callback = readers.get(key)
                if callback is None:
                    continue  # removed by an earlier callback of this round
                self.__guard(callback, ())
                if not self.__running:
                    return
            if timers and timers[0][0] <= time.monotonic():
                self.__run_timers()
            self.__guard(self.on_tick, ())

    def __run_timers(self) -> None:
        timers = self.__timers
        now = time.monotonic()
        while timers and timers[0][0] <= now and self.__running:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True
                self.__guard(timer.fn, timer.args)

    def __guard(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a callback's bug must not end the thread
            log.exception("%s: %r failed", self.name, fn)
            self.on_error(getattr(fn, "__name__", "call"), exc)

    def __drain_mailbox(self) -> None:
        try:
            os.read(self.__wake_r, 4096)
        except BlockingIOError:
            pass
        self.__signalled = False
        mailbox = self.__mailbox
        while mailbox and self.__running:
            fn, args = mailbox.popleft()
            self.__guard(fn, args)

    def __finish(self, *, teardown: bool) -> None:
        if teardown:
            self.__guard(self.teardown, ())
        with self.__lock:
            self.__accepting = False
            self.__state = "stopped"
            pending = list(self.__mailbox)
            self.__mailbox.clear()
            self.__close_pipe()
        for fn, _ in pending:  # they will never run: release whoever waits on them
            if isinstance(fn, _Call):
                fn.future.cancel()
        for endpoint in reversed(self.__endpoints):
            endpoint.close()
        self.__endpoints.clear()
        self.__readers.clear()

    def __close_pipe(self) -> None:
        for fd in (self.__wake_r, self.__wake_w):
            if fd >= 0:
                os.close(fd)
        self.__wake_r = self.__wake_w = -1

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.__state}>"


def _poll_key(source: Pollable) -> Any:
    return source if isinstance(source, int) else source.socket


class _Call:
    """A queued call whose outcome lands in a future."""

    __slots__ = ("fn", "args", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
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

    def __repr__(self) -> str:
        return f"<call {self.fn!r}>"


__all__ = ["SocketThread", "Timer"]
