"""Helpers for the unit manager's integration tests (not a test module).

- :class:`ManagerProcess`: ``edgellm unit-manager`` as a real process on a free port;
- :class:`UnitProcess`: ``edgellm unit echo`` as a real process;
- :class:`Client`: a TCP client speaking newline-delimited JSON like the upstream sample;
- :class:`StackFlowNode`: a unit written with raw pyzmq exactly as the C++ StackFlow test
  node behaves on the wire (``node/test`` + ``StackFlow.cpp`` + ``channel.cpp`` +
  ``pzmq.hpp``): a REP socket at ``rpc.<name>`` answering ``None`` and handing the work to
  an event thread, a new context and REQ socket for every sys call (two frames), a PUB
  bound at the task's output url, a SUB on its inference url, a PUSH re-targeted to each
  request's ``zmq_com``, envelopes dumped with sorted keys plus ``\\n``.
"""

from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Any

import zmq

from edgellm.protocol.params import get_param

LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")
START_TIMEOUT = 20.0


def _read_line_until(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no line matching {pattern!r} within {timeout}s")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            continue
        # stdout is unbuffered bytes: readline takes exactly one line, so select stays truthful
        line = proc.stdout.readline().decode("utf-8", errors="replace")
        if not line:
            raise RuntimeError(f"process exited ({proc.poll()}) before printing {pattern!r}")
        if re.search(pattern, line):
            return line


class _Process:
    proc: subprocess.Popen

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class ManagerProcess(_Process):
    """``edgellm unit-manager --port 0 --runtime-dir D`` until :meth:`stop`."""

    def __init__(self, runtime_dir: str, *extra: str, cwd: str | None = None):
        self.runtime_dir = runtime_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING", "unit-manager",
             "--port", "0", "--runtime-dir", runtime_dir, *extra],
            stdout=subprocess.PIPE,
            bufsize=0,
            cwd=cwd,
        )
        try:
            line = _read_line_until(self.proc, LISTENING.pattern, START_TIMEOUT)
        except BaseException:
            self.kill()
            raise
        self.started_line = line.strip()
        self.port = int(LISTENING.search(line).group(2))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class UnitProcess(_Process):
    """``edgellm unit <kind> --runtime-dir D [--name N] [extra...]``, once it reports ready."""

    def __init__(self, runtime_dir: str, name: str = "llm", kind: str = "echo", *extra: str,
                 timeout: float = START_TIMEOUT, log_level: str = "WARNING",
                 stderr=None):  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.cli", "--log-level", log_level, "unit", kind,
             "--runtime-dir", runtime_dir, "--name", name, *extra],
            stdout=subprocess.PIPE,
            stderr=stderr,
            bufsize=0,
        )
        try:
            _read_line_until(self.proc, "ready", timeout)
        except BaseException:
            self.kill()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Client:
    """One TCP connection; newline-delimited JSON like upstream ``sample/test.py``."""

    def __init__(self, port: int, timeout: float = 15.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, request: dict | bytes) -> None:
        if isinstance(request, dict):
            request = (json.dumps(request, ensure_ascii=False) + "\n").encode()
        self.sock.sendall(request)

    def recv_raw(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the manager closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def recv(self) -> dict:
        return json.loads(self.recv_raw())

    def request(self, request: dict) -> dict:
        self.send(request)
        return self.recv()

    def stream(self, request: dict) -> list[dict]:
        """Send an inference; collect answers up to the terminal one."""
        self.send(request)
        out = []
        while True:
            answer = self.recv()
            out.append(answer)
            data = answer.get("data")
            if answer["error"]["code"] != 0 or not isinstance(data, dict) or data.get("finish"):
                return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def setup_request(unit: str = "llm", request_id: str = "llm_001", **data: Any) -> dict:
    """The upstream sample client's setup request."""
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


def inference_request(work_id: str, text: str, request_id: str = "llm_001", unit: str = "llm") -> dict:
    return {"request_id": request_id, "work_id": work_id, "action": "inference",
            "object": f"{unit}.utf-8.stream", "data": {"delta": text, "index": 0, "finish": True}}


def socket_files(directory: str) -> list[str]:
    """Every unix socket file under ``directory``."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            try:
                if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.append(path)
            except FileNotFoundError:
                pass
    return found


# -- a StackFlow-style node, byte-faithful to the C++ one -------------------------------------


def _dump(body: dict) -> bytes:
    """nlohmann::json::dump(): keys sorted (std::map), compact, UTF-8 unescaped; then ``\\n``."""
    return (json.dumps(body, ensure_ascii=False, separators=(",", ":"), sort_keys=True) + "\n").encode()


class _Task:
    def __init__(self, node: "StackFlowNode", number: int, out_url: str, inf_url: str):
        self.node = node
        self.number = number
        self.work_id = f"{node.name}.{number}"
        self.out_url, self.inf_url = out_url, inf_url
        self.request_id = ""
        self.push_url = ""
        self.config: dict = {}
        self.stop = threading.Event()
        self.pub = node.ctx.socket(zmq.PUB)
        self.pub.linger = 0
        self.pub.bind(out_url)
        self.push: zmq.Socket | None = None
        self.thread: threading.Thread | None = None
        self.sent = 0  # streamed pieces sent

    def start_inference(self) -> None:
        self.thread = threading.Thread(target=self._sub_loop, daemon=True)
        self.thread.start()

    def _sub_loop(self) -> None:
        if self.stop.wait(self.node.subscribe_delay):
            return
        sub = self.node.ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sub.connect(self.inf_url)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            while not self.stop.is_set():
                if not sub.poll(50):
                    continue
                raw = sub.recv()
                self.node.inbox.append(raw)
                msg = json.loads(raw)
                if msg.get("zmq_com"):
                    self.set_push_url(msg["zmq_com"])
                self.request_id = msg.get("request_id", "")
                data = msg.get("data")
                if self.node.silent:
                    continue
                if isinstance(data, dict) and data.get("finish"):
                    text = data.get("delta", "")
                    for i, (delta, finish) in enumerate(((text, False), ("hello", False), ("", True))):
                        if self.stop.is_set():
                            return  # the node "dies" mid-stream
                        self.send(self.config.get("response_format", ""),
                                  {"index": i, "delta": delta, "finish": finish})
                        if self.node.piece_delay:
                            time.sleep(self.node.piece_delay)
        finally:
            sub.close(linger=0)

    def set_push_url(self, url: str) -> None:
        if url != self.push_url:
            self.push_url = url
            if self.push is not None:
                self.push.close(linger=0)
            self.push = self.node.ctx.socket(zmq.PUSH)
            self.push.setsockopt(zmq.SNDTIMEO, 3000)
            self.push.connect(url)

    def send(self, object_: str, data: Any) -> None:
        out = _dump({"request_id": self.request_id, "work_id": self.work_id, "created": int(time.time()),
                     "object": object_, "data": data, "error": {"code": 0, "message": ""}})
        self.pub.send(out)
        if self.push is not None:
            self.push.send(out)
        self.sent += 1

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self.pub.close(linger=0)
        if self.push is not None:
            self.push.close(linger=0)


class StackFlowNode:
    """The C++ test node's behaviour with raw pyzmq. ``silent`` tasks take inference
    requests and never answer; ``piece_delay`` spaces the streamed pieces;
    ``subscribe_delay`` makes a task's SUB connect that long after setup."""

    def __init__(self, runtime_dir: str, name: str = "llm", *, silent: bool = False,
                 piece_delay: float = 0.0, subscribe_delay: float = 0.0):
        self.runtime_dir = runtime_dir.rstrip("/")
        self.name = name
        self.silent = silent
        self.piece_delay = piece_delay
        self.subscribe_delay = subscribe_delay
        self.ctx = zmq.Context()
        self.tasks: dict[int, _Task] = {}
        self.inbox: list[bytes] = []  # raw inference messages as received
        self.sys_replies: list[bytes] = []
        self.events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.rpc_url = f"ipc://{self.runtime_dir}/rpc.{name}"
        self._rep = self.ctx.socket(zmq.REP)
        self._rep.linger = 0
        self._rep.bind(self.rpc_url)
        self._threads = [threading.Thread(target=self._rpc_loop, daemon=True),
                         threading.Thread(target=self._event_loop, daemon=True)]
        for t in self._threads:
            t.start()

    # pzmq::call_rpc_action: a new context and REQ socket per call, two frames, 3 s timeouts.
    def unit_call(self, service: str, action: str, data: str) -> bytes:
        url = f"ipc://{self.runtime_dir}/rpc.{service}"
        if not os.path.exists(url[len("ipc://"):]):
            return b""
        ctx = zmq.Context()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.SNDTIMEO, 3000)
        req.setsockopt(zmq.RCVTIMEO, 3000)
        req.linger = 0
        try:
            req.connect(url)
            req.send(action.encode(), zmq.SNDMORE)
            req.send(data.encode())
            try:
                return req.recv()
            except zmq.Again:
                return b""
        finally:
            req.close(linger=0)
            ctx.term()

    def _rpc_loop(self) -> None:
        while not self._stop.is_set():
            if not self._rep.poll(50):
                continue
            action = self._rep.recv().decode()
            data = self._rep.recv() if self._rep.getsockopt(zmq.RCVMORE) else b""
            if action == "list_action":
                self._rep.send(b'{"actions":["list_action","setup","exit","taskinfo"]}')
            elif action in ("setup", "exit", "taskinfo", "pause", "work", "link", "unlink"):
                self.events.put((action, get_param(data, 0).decode(), get_param(data, 1).decode()))
                self._rep.send(b"None")
            else:
                self._rep.send(b"NotAction")

    def _event_loop(self) -> None:
        while not self._stop.is_set():
            try:
                action, zmq_url, raw = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            request = json.loads(raw)
            getattr(self, "_" + action, self._unsupported)(zmq_url, request)

    def _reply(self, zmq_url: str, request: dict, object_: str, data: Any, work_id: str,
               error: dict | None = None) -> None:
        # StackFlow::send: a new PUSH for every message, to the caller's zmq url.
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDTIMEO, 3000)
        push.linger = 1000
        push.connect(zmq_url)
        push.send(_dump({"request_id": request.get("request_id", ""), "work_id": work_id,
                         "created": int(time.time()), "object": object_, "data": data,
                         "error": error or {"code": 0, "message": ""}}))
        push.close()

    def _setup(self, zmq_url: str, request: dict) -> None:
        reply = self.unit_call("sys", "register_unit", self.name)
        self.sys_replies.append(reply)
        str_port = get_param(reply, 1)
        out_url = get_param(str_port, 0).decode()
        inf_url = get_param(str_port, 1).decode()
        number = int(get_param(reply, 0))
        old = self.tasks.pop(number, None)
        if old is not None:
            old.close()
        task = _Task(self, number, out_url, inf_url)
        task.config = request.get("data") or {}
        task.set_push_url(zmq_url)
        task.request_id = request.get("request_id", "")
        task.start_inference()
        self.tasks[number] = task
        self._reply(zmq_url, request, "None", "None", task.work_id)

    def _taskinfo(self, zmq_url: str, request: dict) -> None:
        work_id = request.get("work_id", "")
        if "." not in work_id:
            self._reply(zmq_url, request, f"{self.name}.tasklist",
                        [t.work_id for t in self.tasks.values()], work_id)
            return
        task = self.tasks.get(int(work_id.split(".")[1]))
        if task is None:
            self._reply(zmq_url, request, "None", "None", work_id,
                        {"code": -6, "message": "Unit Does Not Exist"})
            return
        cfg = task.config
        self._reply(zmq_url, request, f"{self.name}.taskinfo",
                    {"model": cfg.get("model"), "response_format": cfg.get("response_format"),
                     "enoutput": cfg.get("enoutput"), "inputs": [cfg.get("input")]}, work_id)

    def _exit(self, zmq_url: str, request: dict) -> None:
        work_id = request.get("work_id", "")
        try:
            number = int(work_id.split(".")[1])
        except (IndexError, ValueError):
            number = -1
        task = self.tasks.pop(number, None)
        if task is None:
            self._reply(zmq_url, request, "None", "None", work_id,
                        {"code": -6, "message": "Unit Does Not Exist"})
            return
        task.close()
        self._reply(zmq_url, request, "None", "None", work_id)
        self.unit_call("sys", "release_unit", work_id)

    def _unsupported(self, zmq_url: str, request: dict) -> None:
        self._reply(zmq_url, request, "None", "None", request.get("work_id", ""),
                    {"code": -18, "message": "not have unit action!"})

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for task in self.tasks.values():
            task.close()
        self._rep.close(linger=0)
        path = self.rpc_url[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)
        self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["Client", "ManagerProcess", "StackFlowNode", "UnitProcess", "inference_request",
           "setup_request", "socket_files"]
