"""The fault matrix, timed: how long each fault takes to reach a clear outcome, against the
healthy path to the same outcome, in the same run (real processes: ``edgellm unit-manager`` and
``edgellm unit llm`` on the default model, or ``--model NAME=PATH``).

- ``unit_killed``: a unit SIGKILLed mid-stream -> the client's terminal error (goal: < 1 s).
  Baseline: ``pause`` on a streaming task -> its terminal ``abort`` piece.
- ``client_gone``: a client that disconnects mid-generation -> the engine stopped generating
  and the task's work id released (``lstask`` empty). Baseline: ``exit`` -> the same.
- ``manager_restart``: the unit manager SIGKILLed and started again -> the old client's end
  of stream, the unit registered again (``lsunit``), its model listed (``lsmode``), a new
  session's setup and inference done (goal: < 2 s from the restart). Baseline: the same new
  session on a manager that was never killed.

Each is repeated ``--rounds`` times; medians and maxima in seconds. The last line is one JSON
object.

    python bench/faults.py [--rounds 5] [--model NAME=PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time

from bus import LISTENING, start, stop

STREAM = "llm.utf-8.stream"
LONG = {"prompt": "Tell me a long story about a lighthouse.", "max_tokens": 2000,
        "ignore_eos": True}  # fmt: skip


class Line:
    """A newline-delimited JSON client of the front door."""

    def __init__(self, port: int, timeout: float = 60.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, body: dict) -> None:
        self.sock.sendall(json.dumps(body).encode() + b"\n")

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("end of stream")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, body: dict) -> dict:
        self.send(body)
        return self.recv()

    def call(self, action: str, work_id: str = "sys", **extra) -> dict:
        return self.request({"request_id": action, "work_id": work_id, "action": action, **extra})

    def close(self) -> None:
        self.sock.close()


def setup(client: Line, model: str) -> str:
    answer = client.call("setup", "llm", object="llm.setup",
                         data={"model": model, "response_format": STREAM, "input": STREAM,
                               "enoutput": True, "max_token_len": 2048})  # fmt: skip
    if answer["error"]["code"] != 0:
        raise RuntimeError(f"setup failed: {answer}")
    return answer["work_id"]


def generate(client: Line, work_id: str, pieces: int = 3) -> None:
    """A long generation, read until ``pieces`` pieces came: it runs now."""
    client.send({"request_id": "g", "work_id": work_id, "action": "inference", "object": STREAM,
                 "data": LONG})  # fmt: skip
    for _ in range(pieces):
        answer = client.recv()
        if answer["error"]["code"] != 0:
            raise RuntimeError(f"generation failed: {answer}")


def until_terminal(client: Line) -> dict:
    while True:
        answer = client.recv()
        data = answer["data"]
        if answer["error"]["code"] != 0 or not isinstance(data, dict) or data.get("finish"):
            return answer


def wait_for(check, timeout: float = 30.0, every: float = 0.005) -> float:
    """Poll ``check()`` until true; the time it took."""
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{check} not true within {timeout}s")
        time.sleep(every)
    return time.perf_counter() - t0


def idle(watcher: Line, model: str) -> bool:
    stats = watcher.call("stats", "llm")["data"][model]
    return stats["num_requests_running"] + stats["num_requests_waiting"] == 0


class Stack:
    """A unit manager and an llm unit in ``runtime_dir``."""

    def __init__(self, runtime_dir: str, model_arg: list[str]):
        self.dir = runtime_dir
        self.model_arg = model_arg
        self.manager = self.port = None
        self.unit = None

    def start_manager(self, *extra: str) -> float:
        """Start the manager; seconds from spawn to listening."""
        t0 = time.perf_counter()
        self.manager, line = start([sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING",
                                    "unit-manager", "--port", "0", "--runtime-dir", self.dir,
                                    *extra], "listening on", os.path.join(self.dir, "manager.log"))  # fmt: skip
        self.port = int(LISTENING.search(line).group(2))
        return time.perf_counter() - t0

    def start_unit(self) -> None:
        self.unit, _ = start([sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING",
                              "unit", "llm", "--runtime-dir", self.dir, "--threads", "1",
                              *self.model_arg], "ready", os.path.join(self.dir, "unit.log"),
                             timeout=600)  # fmt: skip

    def stop(self) -> None:
        for proc in (self.unit, self.manager):
            if proc is not None:
                stop(proc)


def read_until(client: Line, wanted: set[str]) -> None:
    """Read until the answer to each request id in ``wanted`` (a stream: its terminal piece)."""
    wanted = set(wanted)
    while wanted:
        answer = client.recv()
        data = answer["data"]
        if answer["error"]["code"] != 0 or not isinstance(data, dict) or data.get("finish"):
            wanted.discard(answer["request_id"])


def unit_killed(stack: Stack, model: str) -> tuple[float, float]:
    """(pause baseline, kill) seconds; the unit is started again afterwards."""
    client = Line(stack.port)
    try:
        work_id = setup(client, model)
        generate(client, work_id)
        t0 = time.perf_counter()
        client.send({"request_id": "pause", "work_id": work_id, "action": "pause"})
        read_until(client, {"g", "pause"})  # the generation's terminal "abort" piece
        baseline = time.perf_counter() - t0
        client.send({"request_id": "work", "work_id": work_id, "action": "work"})
        read_until(client, {"work"})
        generate(client, work_id)
        os.kill(stack.unit.pid, signal.SIGKILL)
        t0 = time.perf_counter()
        answer = until_terminal(client)
        fault = time.perf_counter() - t0
        if answer["error"]["code"] != -9:
            raise RuntimeError(f"not the terminal error expected: {answer}")
    finally:
        client.close()
        stack.unit.wait()
    stack.start_unit()
    return baseline, fault


def client_gone(stack: Stack, model: str) -> tuple[float, float]:
    """(exit baseline, disconnect) seconds until idle and released."""
    watcher = Line(stack.port)
    try:
        times = []
        for leave in (False, True):
            client = Line(stack.port)
            work_id = setup(client, model)
            generate(client, work_id)
            t0 = time.perf_counter()
            if leave:
                client.close()
            else:
                client.send({"request_id": "x", "work_id": work_id, "action": "exit"})
            wait_for(lambda: idle(watcher, model) and watcher.call("lstask")["data"] == [])
            times.append(time.perf_counter() - t0)
            client.close()
        return times[0], times[1]
    finally:
        watcher.close()


def new_session(port: int, model: str) -> None:
    client = Line(port)
    try:
        work_id = setup(client, model)
        client.send({"request_id": "i", "work_id": work_id, "action": "inference",
                     "object": STREAM, "data": {"prompt": "Hi", "max_tokens": 4}})  # fmt: skip
        if until_terminal(client)["error"]["code"] != 0:
            raise RuntimeError("inference failed")
    finally:
        client.close()


def manager_restart(stack: Stack, model: str) -> dict[str, float]:
    t0 = time.perf_counter()
    new_session(stack.port, model)
    baseline = time.perf_counter() - t0
    old = Line(stack.port)
    work_id = setup(old, model)
    generate(old, work_id)
    stack.manager.kill()
    killed = time.perf_counter()
    try:
        until_terminal(old)
        raise RuntimeError("the old client got an answer, not the end of its stream")
    except ConnectionError:
        eof = time.perf_counter() - killed
    finally:
        old.close()
    stack.manager.wait()
    restarted = time.perf_counter()
    listening = stack.start_manager()
    t1 = time.perf_counter()
    new_session(stack.port, model)
    session_done = time.perf_counter()
    watcher = Line(stack.port)
    try:
        pid = stack.unit.pid
        wait_for(lambda: any(u.get("pid") == pid for u in watcher.call("lsunit")["data"]))
        registered = time.perf_counter() - restarted
        wait_for(lambda: any(m.get("unit") == "llm" for m in watcher.call("lsmode")["data"]))
        listed = time.perf_counter() - restarted
    finally:
        watcher.close()
    return {
        "baseline_session_s": baseline,
        "old_client_eof_s": eof,
        "listening_s": listening,
        "session_s": session_done - t1,
        "restart_to_session_s": session_done - restarted,
        "restart_to_registered_s": registered,
        "restart_to_listed_s": listed,
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", help="NAME=PATH (default: the default model)")
    args = parser.parse_args()
    model_arg = ["--model", args.model] if args.model else []
    model = args.model.split("=", 1)[0] if args.model else "SmolLM2-135M-Instruct"
    runtime_dir = tempfile.mkdtemp(prefix="faults-", dir="/tmp")
    stack = Stack(runtime_dir, model_arg)
    rounds: dict[str, list] = {"unit_killed": [], "client_gone": [], "manager_restart": []}
    try:
        stack.start_manager()
        stack.start_unit()
        new_session(stack.port, model)  # warm
        for _ in range(args.rounds):
            rounds["unit_killed"].append(unit_killed(stack, model))
            rounds["client_gone"].append(client_gone(stack, model))
            rounds["manager_restart"].append(manager_restart(stack, model))
    finally:
        stack.stop()
        shutil.rmtree(runtime_dir, ignore_errors=True)
    result: dict = {"rounds": args.rounds, "model": model}
    for name, label in (("unit_killed", "pause"), ("client_gone", "exit")):
        base = [b for b, _ in rounds[name]]
        fault = [f for _, f in rounds[name]]
        result[name] = {f"baseline_{label}_s": summary(base), "fault_s": summary(fault),
                        "ratio_median": round(statistics.median(fault) / statistics.median(base), 2)}  # fmt: skip
    restarts = rounds["manager_restart"]
    result["manager_restart"] = {key: summary([r[key] for r in restarts]) for key in restarts[0]}
    result["manager_restart"]["ratio_session_median"] = round(
        statistics.median(r["session_s"] for r in restarts)
        / statistics.median(r["baseline_session_s"] for r in restarts), 2)
    for name, figures in result.items():
        print(f"{name}: {figures}", file=sys.stderr, flush=True)
    print(json.dumps(result, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
