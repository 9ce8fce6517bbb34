"""The socket thread, in process, with real sockets: start/stop, the mailbox, readers,
timers, ticks, errors."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import zmq

from edgellm.comm.endpoints import Pull, Push
from edgellm.comm.errors import EndpointError
from edgellm.comm.loop import SocketThread

pytestmark = pytest.mark.usefixtures("no_endpoint_left")


class Inbox(SocketThread):
    """Reads a PULL; what arrives, and on which thread, lands in ``received``."""

    def __init__(self, url: str, **kw):
        super().__init__("inbox", **kw)
        self.url = url
        self.received: list[tuple[bytes, str]] = []
        self.got = threading.Event()
        self.setup_thread = ""

    def setup(self) -> None:
        self.setup_thread = threading.current_thread().name
        self.pull = self.open(Pull, self.url)
        self.add_reader(self.pull, self._read)

    def _read(self) -> None:
        for msg in self.pull.drain(64):
            self.received.append((msg, threading.current_thread().name))
        self.got.set()


def test_setup_runs_on_the_thread_and_readers_get_messages(runtime_dir, sockets):
    url = f"ipc://{runtime_dir}/inbox.sock"
    with Inbox(url) as inbox:
        assert inbox.setup_thread == "inbox" and inbox.alive
        push = sockets(zmq.PUSH)
        push.connect(url)
        push.send(b"one")
        assert inbox.got.wait(5)
        assert inbox.received == [(b"one", "inbox")]
    assert not inbox.alive
    assert not os.path.exists(f"{runtime_dir}/inbox.sock")  # closed, file removed


def test_start_raises_what_setup_raised_and_closes_what_it_opened(runtime_dir, bound):
    _, port = bound(zmq.PULL)
    failing = Inbox(f"tcp://127.0.0.1:{port}")
    with pytest.raises(EndpointError):
        failing.start()
    assert not failing.alive
    with pytest.raises(RuntimeError):
        failing.start()
    assert failing.stop() is True


def test_stop_is_idempotent_and_a_never_started_thread_stops_at_once(runtime_dir):
    never = Inbox(f"ipc://{runtime_dir}/never.sock")
    assert never.stop() and never.stop()
    assert never.call_soon(print) is False
    inbox = Inbox(f"ipc://{runtime_dir}/twice.sock").start()
    assert inbox.stop() is True
    assert inbox.stop() is True
    assert inbox.call_soon(print) is False


def test_calls_run_in_order_on_the_thread_and_those_queued_before_stop_run(runtime_dir):
    inbox = Inbox(f"ipc://{runtime_dir}/calls.sock").start()
    ran: list[tuple[int, str]] = []
    gate = threading.Event()
    inbox.call_soon(gate.wait, 5)  # the thread is busy while the rest is queued
    for i in range(100):
        assert inbox.call_soon(lambda i=i: ran.append((i, threading.current_thread().name)))
    gate.set()
    assert inbox.stop() is True
    assert ran == [(i, "inbox") for i in range(100)]


def test_submit_returns_results_and_errors_and_cancels_what_will_never_run(runtime_dir):
    inbox = Inbox(f"ipc://{runtime_dir}/submit.sock").start()
    assert inbox.submit(lambda a, b: a + b, 2, 3).result(5) == 5
    with pytest.raises(ZeroDivisionError):
        inbox.submit(lambda: 1 / 0).result(5)
    gate = threading.Event()
    first = inbox.submit(gate.wait, 5)
    inbox.call_soon(inbox.halt)  # ends the loop: what is queued after it never runs
    never = inbox.submit(lambda: "ran")
    gate.set()
    assert first.result(5) is True
    assert inbox.stop() is True
    assert never.cancelled()
    assert inbox.submit(lambda: "late").cancelled()


def test_a_failing_callback_is_logged_and_the_thread_goes_on(runtime_dir, caplog):
    errors: list[str] = []

    class Reporting(Inbox):
        def on_error(self, where: str, exc: BaseException) -> None:
            errors.append(f"{where}: {exc}")

    with Reporting(f"ipc://{runtime_dir}/err.sock") as inbox:
        with caplog.at_level(logging.ERROR, logger="edgellm.comm.loop"):
            inbox.call_soon(lambda: 1 / 0)
            assert inbox.submit(lambda: "still serving").result(5) == "still serving"
    assert errors == ["<lambda>: division by zero"]
    assert "ZeroDivisionError" in caplog.text  # with its traceback


def test_timers_fire_in_deadline_order_and_cancelled_ones_do_not(runtime_dir):
    fired: list[str] = []
    done = threading.Event()
    with Inbox(f"ipc://{runtime_dir}/timers.sock") as inbox:
        def arm() -> None:
            inbox.call_later(0.06, lambda: (fired.append("late"), done.set()))
            inbox.call_later(0.02, fired.append, "early")
            inbox.call_later(0.04, fired.append, "cancelled").cancel()

        inbox.call_soon(arm)
        assert done.wait(5)
    assert fired == ["early", "late"]


def test_on_tick_runs_every_tick_without_events(runtime_dir):
    ticks = threading.Semaphore(0)

    class Ticking(Inbox):
        def on_tick(self) -> None:
            ticks.release()

    with Ticking(f"ipc://{runtime_dir}/tick.sock", tick=0.01):
        for _ in range(5):  # no message, no call: only the tick wakes the thread
            assert ticks.acquire(timeout=5)


def test_stop_from_the_thread_itself_ends_the_loop(runtime_dir):
    inbox = Inbox(f"ipc://{runtime_dir}/self.sock").start()
    assert inbox.submit(inbox.stop).result(5) is True
    inbox.stop()
    assert not inbox.alive


def test_endpoints_closed_on_the_thread_stop_being_read(runtime_dir, sockets):
    url = f"ipc://{runtime_dir}/closed.sock"
    with Inbox(url) as inbox:
        inbox.submit(inbox.close_endpoint, inbox.pull).result(5)
        assert inbox.pull.closed
        assert not os.path.exists(url[len("ipc://"):])
        assert inbox.submit(lambda: "alive").result(5) == "alive"


def test_many_threads_wake_one_socket_thread_without_losing_a_call(runtime_dir):
    count = 0

    def bump() -> None:
        nonlocal count
        count += 1

    inbox = Inbox(f"ipc://{runtime_dir}/wake.sock").start()
    workers = [threading.Thread(target=lambda: [inbox.call_soon(bump) for _ in range(2000)])
               for _ in range(4)]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert inbox.stop() is True
    assert count == 8000


def test_a_push_endpoint_of_the_thread_is_closed_with_it(runtime_dir):
    class Sender(SocketThread):
        def setup(self) -> None:
            self.push = self.open(Push, f"ipc://{runtime_dir}/nobody.sock")

    sender = Sender("sender").start()
    assert not sender.push.closed
    sender.stop()
    assert sender.push.closed
