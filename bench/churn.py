"""Connection churn against the unit manager's TCP front door, as upstream's ``sample/stress.py``
drives it: ``--connections`` connections (5,000) from ``--threads`` threads (50), each opened
and closed at once, with and without one request on it.

Modes, each run against this project (``edgellm unit-manager`` + ``edgellm unit echo``, real
processes) and against a baseline in the same run:

- ``connect``: connect, close (``sample/stress.py`` itself). Baseline: a minimal asyncio
  server (accept; answer a line with a line; close on EOF) in a process of its own: what
  Python's asyncio accepts per second on this machine.
- ``ping``: connect, one ``sys`` ``ping``, its answer, close. Baseline: the same asyncio server.
- ``inference``: connect, one streamed inference to a task set up beforehand on another
  connection, its three pieces, close (the manager binds the session's answer socket, the
  unit connects to it). Baseline: ``bench/relay_baseline.py`` (relay + unit), which binds a
  PULL per connection as the C++ original does.

Printed per run: connections (sessions) per second, connect time p50/p99/max (and session
time for the request modes), failures, and the kernel's ``ListenOverflows``/``ListenDrops``
(``/proc/net/netstat``, for the whole network namespace: other programs' overflows count
too). Goals (issue 12): connect-and-close >= 5,000/s, p99 <= 10 ms, none over 200 ms, 0
overflows; with one request, >= 2,000 sessions/s. The last line is one JSON object.

    python bench/churn.py [--connections 5000] [--threads 50] [--modes connect,ping,inference]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

from bus import LISTENING, start, stop

HERE = os.path.dirname(os.path.abspath(__file__))
PING = b'{"request_id":"p","work_id":"sys","action":"ping"}\n'


# -- the baseline server ---------------------------------------------------------------------


class _Echo(asyncio.Protocol):
    """Answers every line with one fixed line; closes when the client does."""

    ANSWER = b'{"created":0,"data":"None","error":{"code":0,"message":""},"object":"None",' \
             b'"request_id":"p","work_id":"sys"}\n'

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for _ in range(data.count(b"\n")):
            self.transport.write(self.ANSWER)


async def _serve_baseline() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", 0, backlog=4096)
    print(f"baseline listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


# -- the client: sample/stress.py's threads ----------------------------------------------------


def listen_counters() -> dict[str, int]:
    """``ListenOverflows`` and ``ListenDrops`` of ``/proc/net/netstat``."""
    with open("/proc/net/netstat") as fh:
        lines = [line.split() for line in fh if line.startswith("TcpExt:")]
    names, values = lines[0][1:], lines[1][1:]
    table = dict(zip(names, map(int, values)))
    return {"overflows": table["ListenOverflows"], "drops": table["ListenDrops"]}


def _read_answers(sock: socket.socket, terminal: bytes) -> None:
    """Read until a line containing ``terminal`` has come."""
    got = b""
    while terminal not in got:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the answer")
        got += chunk


def churn(port: int, connections: int, threads: int, request: bytes | None,
          terminal: bytes = b"\n") -> dict:  # fmt: skip
    """``connections`` connections from ``threads`` threads; with ``request``, each sends it
    and reads up to the line containing ``terminal`` before closing."""
    connect_times: list[float] = []
    session_times: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    remaining = [connections]

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            t0 = time.perf_counter()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(5)  # as sample/stress.py
            try:
                sock.connect(("127.0.0.1", port))
                t1 = time.perf_counter()
                if request is not None:
                    sock.sendall(request)
                    _read_answers(sock, terminal)
                t2 = time.perf_counter()
            except Exception as exc:  # counted, as sample/stress.py does
                with lock:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            finally:
                sock.close()
            connect_times.append(t1 - t0)
            session_times.append(t2 - t0)

    before = listen_counters()
    started = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - started
    after = listen_counters()
    out = {
        "ok": len(connect_times),
        "failed": sum(errors.values()),
        "per_s": round(len(connect_times) / wall, 1),
        "connect_ms": _percentiles(connect_times),
        "over_200ms": sum(1 for t in connect_times if t > 0.2),
        "listen_overflows": after["overflows"] - before["overflows"],
        "listen_drops": after["drops"] - before["drops"],
    }
    if request is not None:
        out["session_ms"] = _percentiles(session_times)
    if errors:
        out["errors"] = errors
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def pct(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)

    return {"p50": pct(0.5), "p99": pct(0.99), "max": round(values[-1] * 1000, 2)}


def _setup_task(port: int) -> tuple[socket.socket, str]:
    """A task of the echo unit, set up on a connection kept open (tasks belong to the
    connection that set them up)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(json.dumps({
        "request_id": "s", "work_id": "llm", "action": "setup", "object": "llm.setup",
        "data": {"model": "m", "response_format": "llm.utf-8.stream",
                 "input": "llm.utf-8.stream", "enoutput": True},
    }).encode() + b"\n")  # fmt: skip
    answer = b""
    while b"\n" not in answer:
        answer += sock.recv(65536)
    return sock, json.loads(answer)["work_id"]


def _inference(work_id: str) -> bytes:
    return json.dumps({"request_id": "i", "work_id": work_id, "action": "inference",
                       "object": "llm.utf-8.stream",
                       "data": {"delta": "hi", "index": 0, "finish": True}}).encode() + b"\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=50)
    parser.add_argument("--modes", default="connect,ping,inference")
    parser.add_argument("role", nargs="?", default="bench", choices=("bench", "baseline-server"))
    args = parser.parse_args()
    if args.role == "baseline-server":
        asyncio.run(_serve_baseline())
        return
    modes = args.modes.split(",")
    python = sys.executable
    ours_dir = tempfile.mkdtemp(prefix="churn-ours-", dir="/tmp")
    relay_dir = tempfile.mkdtemp(prefix="churn-relay-", dir="/tmp")
    procs = []
    result: dict = {"connections": args.connections, "threads": args.threads}
    try:
        manager, line = start([python, "-m", "edgellm.cli", "--log-level", "WARNING",
                               "unit-manager", "--port", "0", "--runtime-dir", ours_dir],
                              "listening on", os.path.join(ours_dir, "manager.log"))  # fmt: skip
        procs.append(manager)
        ours = int(LISTENING.search(line).group(2))
        baseline, line = start([python, os.path.abspath(__file__), "baseline-server"],
                               "listening on", os.path.join(ours_dir, "baseline.log"))  # fmt: skip
        procs.append(baseline)
        base = int(LISTENING.search(line).group(2))
        for mode in ("connect", "ping"):
            if mode not in modes:
                continue
            request = None if mode == "connect" else PING
            churn(base, 200, args.threads, request)  # warm both
            churn(ours, 200, args.threads, request)
            result[f"baseline_{mode}"] = churn(base, args.connections, args.threads, request)
            result[mode] = churn(ours, args.connections, args.threads, request)
            result[f"ratio_{mode}_per_s"] = round(
                result[mode]["per_s"] / result[f"baseline_{mode}"]["per_s"], 2)
        if "inference" in modes:
            unit, _ = start([python, "-m", "edgellm.cli", "--log-level", "WARNING", "unit", "echo",
                             "--runtime-dir", ours_dir], "ready",
                            os.path.join(ours_dir, "unit.log"))  # fmt: skip
            procs.append(unit)
            relay, line = start([python, os.path.join(HERE, "relay_baseline.py"), "relay",
                                 "--dir", relay_dir], "listening on",
                                os.path.join(relay_dir, "relay.log"))  # fmt: skip
            procs.append(relay)
            relay_port = int(LISTENING.search(line).group(2))
            relay_unit, _ = start([python, os.path.join(HERE, "relay_baseline.py"), "unit",
                                   "--dir", relay_dir], "ready",
                                  os.path.join(relay_dir, "unit.log"))  # fmt: skip
            procs.append(relay_unit)
            owner, work_id = _setup_task(ours)
            try:
                request = _inference(work_id)
                final = b'"finish":true'
                relay_request = _inference("llm.0")
                churn(relay_port, 200, args.threads, relay_request, final)
                churn(ours, 200, args.threads, request, final)
                result["relay_inference"] = churn(relay_port, args.connections, args.threads,
                                                  relay_request, final)  # fmt: skip
                result["inference"] = churn(ours, args.connections, args.threads, request, final)
                result["ratio_inference_per_s"] = round(
                    result["inference"]["per_s"] / result["relay_inference"]["per_s"], 2)
            finally:
                owner.close()
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(ours_dir, ignore_errors=True)
        shutil.rmtree(relay_dir, ignore_errors=True)
    for name, figures in result.items():
        print(f"{name}: {figures}", file=sys.stderr, flush=True)
    print(json.dumps(result, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
