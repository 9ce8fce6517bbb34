"""The echo unit behind this project's own unit manager, both as real processes, with a
TCP client: a two-task chain and taskinfo (the manager's own end-to-end tests cover the
rest)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
from test_interop_cpp_manager import setup_request, start_echo_process, stop_process

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("edgellm.manager.commands") is None,
    reason="the unit manager (edgellm.manager) is not in the tree yet",
)

LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")


class Client:
    """One TCP connection speaking newline-delimited JSON, like the sample client."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buffer = b""

    def send(self, request: dict) -> None:
        self.sock.sendall((json.dumps(request, ensure_ascii=False) + "\n").encode())

    def recv(self) -> dict:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("manager closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def request(self, request: dict) -> dict:
        self.send(request)
        return self.recv()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stack():
    """(runtime_dir, tcp_port) of a running unit manager plus echo unit."""
    runtime_dir = tempfile.mkdtemp(prefix="el-", dir="/tmp")
    manager = subprocess.Popen(
        [sys.executable, "-m", "edgellm.cli", "unit-manager", "--host", "127.0.0.1",
         "--port", "0", "--runtime-dir", runtime_dir],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=runtime_dir,
    )
    unit = None
    try:
        line = manager.stdout.readline()
        match = LISTENING.search(line)
        assert match, f"manager did not start: {line!r}"
        unit = start_echo_process(runtime_dir)
        yield runtime_dir, int(match.group(2))
    finally:
        if unit is not None:
            stop_process(unit)
        if manager.poll() is None:
            manager.send_signal(signal.SIGTERM)
        manager.communicate(timeout=10)
        shutil.rmtree(runtime_dir, ignore_errors=True)


def test_chain_and_taskinfo_through_the_unit_manager(stack):
    runtime_dir, port = stack
    client = Client(port)
    try:
        first = client.request(setup_request(request_id="a"))
        assert first["error"] == {"code": 0, "message": ""}, first
        second = client.request(
            setup_request(request_id="b", input=["llm.utf-8.stream", first["work_id"]])
        )
        assert second["error"]["code"] == 0, second
        a, b = first["work_id"], second["work_id"]

        listing = client.request({"request_id": "t", "work_id": "llm", "action": "taskinfo"})
        assert (listing["object"], listing["data"]) == ("llm.tasklist", [a, b])
        info = client.request({"request_id": "t2", "work_id": b, "action": "taskinfo"})
        assert info["object"] == "llm.taskinfo"
        assert info["data"]["inputs"] == ["llm.utf-8.stream", a]

        client.send({"request_id": "q", "work_id": a, "action": "inference",
                     "object": "llm.utf-8.stream",
                     "data": {"delta": "hi", "index": 0, "finish": True}})
        got: dict[str, list[str]] = {a: [], b: []}
        while len(got[a]) < 3 or len(got[b]) < 3:
            reply = client.recv()
            assert reply["error"]["code"] == 0, reply
            got[reply["work_id"]].append(reply["data"]["delta"])
        assert got[a] == ["hi", "hello", ""]
        assert got[b] == ["hihello", "hello", ""]

        for work_id in (b, a):
            reply = client.request({"request_id": "x", "work_id": work_id, "action": "exit"})
            assert (reply["error"]["code"], reply["work_id"]) == (0, work_id)
        listing = client.request({"request_id": "t3", "work_id": "llm", "action": "taskinfo"})
        assert listing["data"] == []
    finally:
        client.close()
    assert os.path.exists(os.path.join(runtime_dir, "rpc.llm"))


def test_streamed_input_and_a_chain_across_two_unit_processes(stack):
    runtime_dir, port = stack
    second_unit = start_echo_process(runtime_dir, "--name", "tts")
    client = Client(port)
    try:
        first = client.request(setup_request(request_id="a"))["work_id"]
        reply = client.request(setup_request(unit="tts", request_id="b", input=[first]))
        assert reply["error"]["code"] == 0, reply
        second = reply["work_id"]
        assert second.startswith("tts.")
        base = {"request_id": "q", "work_id": first, "action": "inference",
                "object": "llm.utf-8.stream"}
        client.send({**base, "data": {"delta": "wor", "index": 1, "finish": False}})
        client.send({**base, "data": {"delta": "hello ", "index": 0, "finish": False}})
        client.send({**base, "data": {"delta": "ld", "index": 2, "finish": True}})
        got: dict[str, list[str]] = {first: [], second: []}
        while len(got[first]) < 3 or len(got[second]) < 3:
            reply = client.recv()
            assert reply["error"]["code"] == 0, reply
            got[reply["work_id"]].append(reply["data"]["delta"])
        assert got[first] == ["hello world", "hello", ""]
        assert got[second] == ["hello worldhello", "hello", ""]
    finally:
        client.close()
        stop_process(second_unit)
    assert not os.path.exists(os.path.join(runtime_dir, "rpc.tts"))
