"""The front door's framing on a real unit manager process: bad input answered at its first
bad byte with nothing after it, an incomplete object waiting up to the idle limit."""

from __future__ import annotations

import time

from manager_support import Client, ManagerProcess


def test_bad_input_is_answered_without_a_newline_or_a_next_message(runtime_dir):
    with ManagerProcess(runtime_dir) as manager, Client(manager.port, timeout=10) as client:
        client.send(b"{bad")  # and nothing more: a person with netcat, a microcontroller
        answer = client.recv()
        assert (answer["error"]["code"], answer["request_id"], answer["work_id"]) == (-2, "0", "sys")
        assert "expected a string key" in answer["error"]["message"]
        client.send(b'json}\n{"request_id":"p","work_id":"sys","action":"ping"}\n')
        pong = client.recv()  # the rest of the bad line went with it
        assert (pong["request_id"], pong["error"]["code"]) == ("p", 0)


def test_an_incomplete_object_waits_for_the_idle_limit_then_is_answered(runtime_dir):
    with ManagerProcess(runtime_dir, "--message-idle-timeout", "0.5") as manager, \
            Client(manager.port, timeout=10) as client:  # fmt: skip
        # valid so far (objects may span lines): the manager waits for the rest...
        client.send(b'{"request_id":"p1","work_id":"sys",\n"action":"ping"')
        client.send(b"\n}\n")
        pong = client.recv()
        assert (pong["request_id"], pong["error"]["code"]) == ("p1", 0)
        # ...but not forever
        started = time.monotonic()
        client.send(b'{"request_id":"p2","work_id":"sys"\n')
        answer = client.recv()
        assert time.monotonic() - started >= 0.45  # it waited for the limit
        assert answer["error"]["code"] == -2 and "never came" in answer["error"]["message"]
        client.send({"request_id": "p3", "work_id": "sys", "action": "ping"})
        assert client.recv()["request_id"] == "p3"
