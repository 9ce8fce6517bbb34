"""Interop: this project's units serve through a unit manager that behaves like the C++
one (Edge-LLM-Infra ``unit-manager/src/*.cpp``).

:class:`CppStyleManager` is that manager's wire behaviour written with raw pyzmq (no
edgellm code), kept faithful to the C++ source:

- ``remote_server.cpp``: the ``sys`` REP service at ``rpc.sys`` (register_unit,
  release_unit, sql_select, sql_set, sql_unset, list_action, ``NotAction``), the port pool
  from 5010, work ids counted from 0, ipc URL suffixes ``.<unit>.output_url`` /
  ``.<unit>.inference_url``, a PUB bound per inference url, key ``<work_id>.out_port``;
- ``unit_action_match``: -2 ``json format error`` (request_id "0", work_id "sys"), an
  empty work_id means ``sys``, ``inference`` gets ``{"zmq_com":"<url>",`` spliced in front
  of the original text and is published on the work id's PUB (unknown: -4), any other
  action is an RPC call ``[action, set_param(com_url, json)]`` to ``rpc.<unit>`` (no
  endpoint: -9);
- ``zmq_bus.cpp`` / ``zmq_com_send``: per-connection PULL at ``c_format % com_id``; errors
  are sent with a fresh PUSH per message and a trailing newline, as upstream does.

A :class:`Session` stands for one TCP connection (com id 8000, 8001, ...): its PULL is
where everything addressed to the client arrives.

These tests are also the reference the other unit tests reuse
(``from test_interop_cpp_manager import CppStyleManager``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

SYS_ACTIONS = ("sql_select", "register_unit", "release_unit", "sql_set", "sql_unset")


def set_param(p0: bytes, p1: bytes) -> bytes:
    return bytes([len(p0)]) + p0 + p1


def get_param(data: bytes, index: int) -> bytes:
    size = data[0]
    return data[1 : 1 + size] if index % 2 == 0 else data[1 + size :]


def nlohmann_dump(obj) -> str:
    """``nlohmann::json::dump()``: keys sorted (std::map), compact, UTF-8 unescaped."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sample_json_str_get(json_str: str, key: str) -> str:
    """``StackFlowUtil.cpp``'s text scan for a key's value: a string comes back bare with
    its escapes left as they are, an object as its text, anything else as its token."""
    start = json_str.find(f'"{key}"')
    if start < 0:
        return ""
    value, status, last, depth = [], 0, "", 0
    for c in json_str[start + len(key) + 2:]:
        if status == 0:
            if c == '"':
                status = 100
            elif c == "{":
                value.append(c)
                depth, status = 1, 10
            elif c == ":":
                depth = 1
            elif c in ",}":
                depth, status = 0, -1
            elif c != " " and depth:
                value.append(c)
        elif status == 10:
            value.append(c)
            depth += (c == "{") - (c == "}")
            if depth == 0:
                status = -1
        elif status == 100:
            if c == '"' and last != "\\":
                depth, status = 0, -1
            else:
                value.append(c)
        last = c
    return "" if depth else "".join(value)


class CppStyleManager:
    """The C++ unit manager's sys service and dispatch, on one thread (upstream serialises
    everything under one lock; one thread is the same order without sharing sockets)."""

    def __init__(self, runtime_dir: str, *, work_id_start: int = 0, min_port: int = 5010,
                 max_port: int = 5555):
        self.runtime_dir = runtime_dir
        self.s_format = f"ipc://{runtime_dir}/llm/%i.sock"
        self.c_format = self.s_format
        self.counter = work_id_start
        self.port_start = min_port
        self.ports = [False] * (max_port - min_port)
        self.kv: dict[str, str] = {}
        self.units: dict[str, dict] = {}
        self.ctx = zmq.Context()
        self.cmd_url = f"inproc://cpp-manager-{id(self)}"
        self.sys_url = f"ipc://{runtime_dir}/rpc.sys"
        self.calls: list[tuple[str, bytes]] = []
        self._next_com = 8000
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._cmd_lock = threading.Lock()
        self._cmd_sock: zmq.Socket | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "CppStyleManager":
        os.makedirs(os.path.join(self.runtime_dir, "llm"), exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="cpp-manager", daemon=True)
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self.command(b"stop", b"")
        self._thread.join(5)
        self._thread = None
        with self._cmd_lock:
            if self._cmd_sock is not None:
                self._cmd_sock.close(linger=0)
        self.ctx.term()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def command(self, kind: bytes, *frames: bytes) -> None:
        with self._cmd_lock:
            if self._cmd_sock is None:
                self._cmd_sock = self.ctx.socket(zmq.PUSH)
                self._cmd_sock.connect(self.cmd_url)
            self._cmd_sock.send_multipart([kind, *frames])

    def publish_raw(self, work_id: str, payload: bytes) -> None:
        """Test hook (not C++ behaviour): publish ``payload`` unchanged on a work id's
        inference PUB, as a broken or hostile manager might."""
        self.command(b"raw", work_id.encode(), payload)

    def session(self) -> "Session":
        com_id = self._next_com
        self._next_com += 1
        return Session(self, com_id)

    # -- the manager thread --------------------------------------------------------------

    def _run(self) -> None:
        rep = self.ctx.socket(zmq.REP)
        rep.linger = 0
        rep.bind(self.sys_url)
        cmd = self.ctx.socket(zmq.PULL)
        cmd.linger = 0
        cmd.bind(self.cmd_url)
        poller = zmq.Poller()
        poller.register(rep, zmq.POLLIN)
        poller.register(cmd, zmq.POLLIN)
        self._ready.set()
        try:
            while True:
                for sock, _ in poller.poll():
                    if sock is rep:
                        frames = rep.recv_multipart()
                        rep.send(self._sys_call(frames))
                    else:
                        kind, *rest = cmd.recv_multipart()
                        if kind == b"stop":
                            return
                        if kind == b"raw":  # test hook: publish bytes as they are
                            work_id, payload = rest
                            self.units[work_id.decode()]["pub"].send(payload)
                            continue
                        com_id, json_str = rest
                        self.unit_action_match(int(com_id), json_str.decode("utf-8", "replace"))
        finally:
            for unit in self.units.values():
                unit["pub"].close(linger=0)
                os.unlink(unit["inference_url"][len("ipc://"):])
            self.units.clear()
            rep.close(linger=0)
            cmd.close(linger=0)
            try:
                os.unlink(self.sys_url[len("ipc://"):])
            except FileNotFoundError:
                pass

    def _sys_call(self, frames: list[bytes]) -> bytes:
        action = frames[0].decode()
        data = frames[1] if len(frames) > 1 else b""
        self.calls.append((action, data))
        if action == "list_action":
            return ('{"actions":[' + ",".join(f'"{a}"' for a in ("list_action", *SYS_ACTIONS))
                    + "]}").encode()
        if action == "register_unit":
            return self._allocate(data.decode())
        if action == "release_unit":
            self._release(data.decode())
            return b"Success"
        if action == "sql_select":
            return self.kv.get(data.decode(), "").encode()
        if action == "sql_set":
            text = data.decode("utf-8", "replace")
            key, val = sample_json_str_get(text, "key"), sample_json_str_get(text, "val")
            if not key:
                return b"False"
            self.kv[key] = val
            return b"Success"
        if action == "sql_unset":
            self.kv.pop(data.decode(), None)
            return b"Success"
        return b"NotAction"

    def _take_port(self) -> int:
        for i, used in enumerate(self.ports):
            if not used:
                self.ports[i] = True
                return self.port_start + i
        raise RuntimeError("port pool exhausted")

    def _url(self, port: int, unit: str, kind: str) -> str:
        fmt = self.s_format
        if "sock" in fmt:
            fmt += f".{unit}.{kind}"
        return fmt % port

    def _allocate(self, unit: str) -> bytes:
        number = self.counter
        self.counter += 1
        work_id = f"{unit}.{number}"
        output_url = self._url(self._take_port(), unit, "output_url")
        inference_url = self._url(self._take_port(), unit, "inference_url")
        pub = self.ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.bind(inference_url)
        self.units[work_id] = {"pub": pub, "output_url": output_url, "inference_url": inference_url}
        self.kv[work_id + ".out_port"] = output_url
        return set_param(str(number).encode(),
                         set_param(output_url.encode(), inference_url.encode()))

    def _port_of(self, url: str) -> int:
        # sscanf(url, "ipc://<dir>/llm/%i.sock", &port)
        prefix = self.s_format.split("%i")[0]
        return int(re.match(r"\d+", url[len(prefix):]).group())

    def _release(self, work_id: str) -> None:
        unit = self.units.pop(work_id, None)
        if unit is None:
            return
        for url in (unit["output_url"], unit["inference_url"]):
            self.ports[self._port_of(url) - self.port_start] = False
        unit["pub"].close(linger=0)
        try:
            os.unlink(unit["inference_url"][len("ipc://"):])
        except FileNotFoundError:
            pass
        self.kv.pop(work_id + ".out_port", None)

    def _zmq_com_send(self, com_id: int, out: str) -> None:
        ctx = zmq.Context()  # upstream: a new context and PUSH for every message
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDTIMEO, 3000)
        push.connect(self.c_format % com_id)
        push.send((out + "\n").encode())
        push.close(linger=1000)
        ctx.term()

    def _usr_print_error(self, request_id: str, work_id: str, code: int, message: str,
                         com_id: int) -> None:
        self._zmq_com_send(com_id, nlohmann_dump({
            "created": int(time.time()), "data": "None",
            "error": {"code": code, "message": message}, "object": "None",
            "request_id": request_id, "work_id": work_id,
        }))

    def unit_action_match(self, com_id: int, json_str: str) -> None:
        try:
            doc = json.loads(json_str)
            request_id, work_id, action = doc["request_id"], doc["work_id"], doc["action"]
            if not all(isinstance(v, str) for v in (request_id, work_id, action)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._usr_print_error("0", "sys", -2, "json format error", com_id)
            return
        if not work_id:
            work_id = "sys"
        if action == "inference":
            raw = '{"zmq_com":"' + (self.c_format % com_id) + '",' + json_str[1:]
            unit = self.units.get(work_id)
            if unit is None:
                self._usr_print_error(request_id, work_id, -4, "inference data push false",
                                      com_id)
                return
            unit["pub"].send(raw.encode())
            return
        unit_name = work_id.split(".")[0]
        if unit_name and self._remote_call(com_id, unit_name, action, json_str) != 0:
            self._usr_print_error(request_id, work_id, -9, "unit call false", com_id)

    def _remote_call(self, com_id: int, unit_name: str, action: str, json_str: str) -> int:
        url = f"ipc://{self.runtime_dir}/rpc.{unit_name}"
        if not os.path.exists(url[len("ipc://"):]):
            return -1
        req = self.ctx.socket(zmq.REQ)
        req.linger = 0
        req.setsockopt(zmq.SNDTIMEO, 3000)
        req.setsockopt(zmq.RCVTIMEO, 3000)
        req.connect(url)
        try:
            req.send_multipart([action.encode(),
                                set_param((self.c_format % com_id).encode(), json_str.encode())])
            try:
                req.recv()
            except zmq.Again:
                pass  # upstream ignores a missing reply
        finally:
            req.close(linger=0)
        return 0


class Session:
    """One client connection of :class:`CppStyleManager`: requests in, replies out of the
    connection's PULL (``c_format % com_id``). Use from one thread."""

    def __init__(self, manager: CppStyleManager, com_id: int):
        self.manager = manager
        self.com_id = com_id
        self.url = manager.c_format % com_id
        self.pull = manager.ctx.socket(zmq.PULL)
        self.pull.linger = 0
        self.pull.bind(self.url)

    def send(self, request) -> None:
        text = request if isinstance(request, str) else json.dumps(request, ensure_ascii=False)
        self.manager.command(b"req", str(self.com_id).encode(), text.encode("utf-8"))

    def recv_raw(self, timeout: float = 10.0) -> bytes:
        if not self.pull.poll(int(timeout * 1000)):
            raise TimeoutError(f"session {self.com_id}: nothing within {timeout}s")
        return self.pull.recv()

    def recv(self, timeout: float = 10.0) -> dict:
        raw = self.recv_raw(timeout)
        assert raw.endswith(b"\n"), raw
        return json.loads(raw)

    def quiet(self, timeout: float = 0.3) -> bool:
        """True if nothing arrives within ``timeout`` (used only to check that nothing
        more comes after a terminal answer)."""
        return not self.pull.poll(int(timeout * 1000))

    def request(self, request, timeout: float = 10.0) -> dict:
        self.send(request)
        return self.recv(timeout)

    def stream(self, request, timeout: float = 10.0) -> list[dict]:
        """Send one inference and collect replies up to the terminal one."""
        self.send(request)
        replies = []
        while True:
            reply = self.recv(timeout)
            replies.append(reply)
            data = reply.get("data")
            if reply["error"]["code"] != 0 or not isinstance(data, dict) or data.get("finish"):
                return replies

    def close(self) -> None:
        self.pull.close(linger=0)
        try:
            os.unlink(self.url[len("ipc://"):])
        except FileNotFoundError:
            pass


def setup_request(unit: str = "llm", request_id: str = "llm_001", **data) -> dict:
    """The upstream sample client's setup (sample/test.py ``create_init_data``)."""
    body = {
        "model": "DeepSeek-R1-Distill-Qwen-1.5B",
        "response_format": f"{unit}.utf-8.stream",
        "input": f"{unit}.utf-8.stream",
        "enoutput": True,
        "max_token_len": 1023,
        "prompt": "You are a knowledgeable assistant.",
    }
    body.update(data)
    return {"request_id": request_id, "work_id": unit, "action": "setup",
            "object": f"{unit}.setup", "data": body}


def inference_request(work_id: str, text: str, request_id: str = "llm_001",
                      object_: str = "llm.utf-8.stream") -> dict:
    return {"request_id": request_id, "work_id": work_id, "action": "inference",
            "object": object_, "data": {"delta": text, "index": 0, "finish": True}}


def start_echo_process(runtime_dir: str, *extra: str) -> subprocess.Popen:
    """``edgellm unit echo --runtime-dir D`` as a real process, waited until ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm.cli", "unit", "echo", "--runtime-dir", runtime_dir,
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        raise AssertionError(f"unit did not start: {line!r} {proc.stderr.read()}")
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, wait, close the pipes; the exit code (killed and raised if it hangs)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    proc.stderr_text = err
    return proc.returncode


@pytest.fixture
def cpp_manager(runtime_dir):
    with CppStyleManager(runtime_dir) as manager:
        yield manager


@pytest.fixture
def echo_process(runtime_dir, cpp_manager):
    proc = start_echo_process(runtime_dir)
    yield proc
    stop_process(proc)


# -- the tests -----------------------------------------------------------------------------


def test_sample_client_session_through_cpp_style_manager(cpp_manager, echo_process):
    session = cpp_manager.session()
    try:
        reply = session.request(setup_request())
        assert reply["error"] == {"code": 0, "message": ""}
        assert reply["request_id"] == "llm_001"
        assert reply["work_id"] == "llm.0"
        assert reply["data"] == "None" and reply["object"] == "None"
        assert isinstance(reply["created"], int)

        replies = session.stream(inference_request("llm.0", "hi there"))
        assert [r["data"] for r in replies] == [
            {"delta": "hi there", "finish": False, "index": 0},
            {"delta": "hello", "finish": False, "index": 1},
            {"delta": "", "finish": True, "index": 2},
        ]
        for r in replies:
            assert r["object"] == "llm.utf-8.stream"
            assert (r["request_id"], r["work_id"]) == ("llm_001", "llm.0")
            assert r["error"] == {"code": 0, "message": ""}

        reply = session.request({"request_id": "llm_exit", "work_id": "llm.0", "action": "exit"})
        assert reply["error"] == {"code": 0, "message": ""}
        assert (reply["request_id"], reply["work_id"]) == ("llm_exit", "llm.0")
    finally:
        session.close()
    # The unit released its work id at the sys service.
    assert ("release_unit", b"llm.0") in cpp_manager.calls
    assert "llm.0.out_port" not in cpp_manager.kv


def test_sys_calls_are_byte_faithful(cpp_manager, echo_process):
    session = cpp_manager.session()
    try:
        session.request(setup_request())
    finally:
        session.close()
    # the unit's registration under its name is a plain sql_set; the setup's first call is
    # register_unit, byte for byte
    registrations = [c for c in cpp_manager.calls if c[0] == "sql_set"
                     and json.loads(c[1])["key"] == "unit.llm"]  # fmt: skip
    assert len(registrations) == 1
    assert json.loads(json.loads(registrations[0][1])["val"])["pid"] == echo_process.pid
    rest = [c for c in cpp_manager.calls if c not in registrations]
    assert rest[0] == ("register_unit", b"llm")


def test_unit_process_sigterm_releases_and_removes_files(runtime_dir, cpp_manager):
    proc = start_echo_process(runtime_dir)
    session = cpp_manager.session()
    try:
        assert session.request(setup_request())["error"]["code"] == 0
        output_url = cpp_manager.kv["llm.0.out_port"]
        assert os.path.exists(output_url[len("ipc://"):])
    finally:
        session.close()
    assert stop_process(proc) == 0
    assert not os.path.exists(os.path.join(runtime_dir, "rpc.llm"))
    assert not os.path.exists(output_url[len("ipc://"):])
    assert ("release_unit", b"llm.0") in cpp_manager.calls


def test_named_unit_process_and_sigint(runtime_dir, cpp_manager):
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm.cli", "unit", "echo", "--name", "echo2",
         "--runtime-dir", runtime_dir],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline() == "edgellm unit echo2 ready\n"
        session = cpp_manager.session()
        try:
            reply = session.request(setup_request(unit="echo2"))
            assert reply["work_id"] == "echo2.0" and reply["error"]["code"] == 0
            replies = session.stream(inference_request("echo2.0", "n", object_="echo2.utf-8.stream"))
            assert [r["data"]["delta"] for r in replies] == ["n", "hello", ""]
            reply = session.request({"request_id": "t", "work_id": "echo2", "action": "taskinfo"})
            assert (reply["object"], reply["data"]) == ("echo2.tasklist", ["echo2.0"])
        finally:
            session.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
    assert not os.path.exists(os.path.join(runtime_dir, "rpc.echo2"))
    assert ("release_unit", b"echo2.0") in cpp_manager.calls


def test_unit_process_stops_when_the_manager_is_already_gone(runtime_dir):
    manager = CppStyleManager(runtime_dir).start()
    proc = start_echo_process(runtime_dir)
    try:
        session = manager.session()
        assert session.request(setup_request())["error"]["code"] == 0
        output_url = manager.kv["llm.0.out_port"]
        session.close()
    finally:
        manager.stop()
    assert stop_process(proc) == 0
    assert not os.path.exists(output_url[len("ipc://"):])
    assert not os.path.exists(os.path.join(runtime_dir, "rpc.llm"))


def test_cpp_manager_dispatch_errors_reach_the_client(cpp_manager, echo_process):
    """The manager side of the interop: what the C++ manager answers by itself."""
    session = cpp_manager.session()
    try:
        assert session.request("{broken")["error"] == {"code": -2, "message": "json format error"}
        reply = session.request(inference_request("llm.9", "x", request_id="i9"))
        assert (reply["error"]["code"], reply["request_id"], reply["work_id"]) == (-4, "i9", "llm.9")
        reply = session.request({"request_id": "n", "work_id": "nobody.1", "action": "setup"})
        assert reply["error"]["code"] == -9
    finally:
        session.close()


def test_unit_process_refuses_an_unusable_runtime_dir_clearly(tmp_path):
    too_long = str(tmp_path / ("x" * 120))
    proc = subprocess.run(
        [sys.executable, "-m", "edgellm.cli", "unit", "echo", "--runtime-dir", too_long],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 1
    assert "edgellm unit:" in proc.stderr and "longer than" in proc.stderr
    assert "Traceback" not in proc.stderr
