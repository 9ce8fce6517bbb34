"""Connections to a real unit manager process: a burst of connect-and-close (upstream's
sample/stress.py) is taken whole, and a connection binds its answer socket only when a unit
will answer it (the rates are bench/churn.py's)."""

from __future__ import annotations

import glob
import os
import socket
import threading

from manager_support import Client, ManagerProcess, UnitProcess, setup_request
from waits import wait_until


def session_sockets(runtime_dir: str) -> list[str]:
    return glob.glob(os.path.join(runtime_dir, "llm", "*.sock"))


def test_a_burst_of_connects_and_closes_is_taken_whole(runtime_dir):
    with ManagerProcess(runtime_dir) as manager:
        failures: list[BaseException] = []

        def connect_and_close(n: int) -> None:
            for _ in range(n):
                try:
                    with socket.create_connection(("127.0.0.1", manager.port), timeout=5):
                        pass
                except OSError as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=connect_and_close, args=(50,)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        with Client(manager.port) as client:
            pong = client.request({"request_id": "after", "work_id": "sys", "action": "ping"})
            assert (pong["request_id"], pong["error"]["code"]) == ("after", 0)
        assert session_sockets(runtime_dir) == []


def test_a_connection_binds_its_answer_socket_when_a_unit_will_answer(runtime_dir):
    with ManagerProcess(runtime_dir) as manager, UnitProcess(runtime_dir):
        with Client(manager.port) as client:
            assert client.request({"request_id": "p", "work_id": "sys", "action": "lsmode"})["error"]["code"] == 0
            assert session_sockets(runtime_dir) == []  # sys actions are answered directly
            assert client.request(setup_request())["error"]["code"] == 0
            (inbox,) = session_sockets(runtime_dir)
        wait_until(lambda: not os.path.exists(inbox), 10, "the closed session's socket removed")
