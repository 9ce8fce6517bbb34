"""Bus benchmark: the unit manager + echo unit against a minimal pyzmq relay, in one run.

Measured, each for this project (``edgellm unit-manager`` + ``edgellm unit echo``, real
processes) and for the baseline (``bench/relay_baseline.py`` relay + unit processes):

- ``single``: one session, sequential inference round trips (request sent -> final
  ``finish: true`` piece received, 3 streamed pieces): p50/p99 ms and requests/s;
- ``concurrent``: 32 sessions at once, each doing sequential round trips: requests/s,
  p50/p99 ms, errors;
- ``memory`` (this project only): resident memory growth of the unit manager over many
  requests on one connection.

The load client is one asyncio process (cheap per request, the same for both sides). The
last line printed is one JSON object with the figures and the ratios (ours / relay).

    python bench/bus.py [--single 2000] [--sessions 32] [--per-session 200] [--memory 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")


def start(
    cmd: list[str], marker: str, log: str, timeout: float = 20.0
) -> tuple[subprocess.Popen, str]:
    """Start a child (its stderr to ``log``, so nothing follows our last line) and wait for
    the line with ``marker`` on its stdout."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if marker in line:
            return proc, line
    proc.kill()
    with open(log, errors="replace") as fh:
        sys.stderr.write(fh.read()[-2000:])
    raise RuntimeError(f"{cmd} did not print {marker!r}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Session(asyncio.Protocol):
    """One client connection: send a line, wait for the terminal answer."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None
        self.answers: list[dict] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            answer = json.loads(line)
            data_ = answer.get("data")
            if answer["error"]["code"] != 0 or not isinstance(data_, dict) or data_.get("finish"):
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(answer)

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    async def request(self, body: dict, timeout: float = 30.0) -> dict:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(json.dumps(body).encode() + b"\n")
        return await asyncio.wait_for(self.waiter, timeout)


async def open_session(port: int, setup: bool) -> tuple[Session, str]:
    loop = asyncio.get_running_loop()
    _, session = await loop.create_connection(Session, "127.0.0.1", port)
    work_id = "llm.0"
    if setup:
        answer = await session.request(
            {
                "request_id": "setup",
                "work_id": "llm",
                "action": "setup",
                "object": "llm.setup",
                "data": {
                    "model": "m",
                    "response_format": "llm.utf-8.stream",
                    "input": "llm.utf-8.stream",
                    "enoutput": True,
                    "max_token_len": 64,
                    "prompt": "p",
                },
            }
        )
        if answer["error"]["code"] != 0:
            raise RuntimeError(f"setup failed: {answer}")
        work_id = answer["work_id"]
    return session, work_id


def inference(work_id: str, i: int) -> dict:
    return {
        "request_id": f"r{i}",
        "work_id": work_id,
        "action": "inference",
        "object": "llm.utf-8.stream",
        "data": {"delta": "hello world", "index": 0, "finish": True},
    }


async def run_sessions(port: int, setup: bool, sessions: int, per_session: int, warmup: int = 20):
    opened = [await open_session(port, setup) for _ in range(sessions)]
    # The relay has no slow-joiner protection: retry the first request until its unit is
    # subscribed (the unit manager holds such a request itself).
    for attempt in range(50):
        try:
            await opened[0][0].request(inference(opened[0][1], -1000), timeout=0.2)
            break
        except asyncio.TimeoutError:
            continue
    for session, work_id in opened:  # warm both sides' caches and connections
        for i in range(warmup):
            await session.request(inference(work_id, -i - 1))
    latencies: list[float] = []
    errors = 0

    async def drive(session: Session, work_id: str) -> None:
        nonlocal errors
        for i in range(per_session):
            t0 = time.perf_counter()
            try:
                answer = await session.request(inference(work_id, i))
            except (asyncio.TimeoutError, ConnectionError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if answer["error"]["code"] != 0:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(drive(s, w) for s, w in opened))
    wall = time.perf_counter() - t0
    for session, _ in opened:
        session.transport.close()
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3)

    return {
        "sessions": sessions,
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / wall, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


async def run_memory(port: int, pid: int, requests: int) -> dict:
    session, work_id = await open_session(port, True)
    for i in range(2000):
        await session.request(inference(work_id, i))
    before = rss_mb(pid)
    peak = before
    for i in range(requests):
        await session.request(inference(work_id, i))
        if i % 5000 == 0:
            peak = max(peak, rss_mb(pid))
    after = rss_mb(pid)
    session.transport.close()
    return {
        "requests": requests,
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "rss_growth_mb": round(max(after, peak) - before, 1),
    }


async def sigterm_exit(port: int, manager: subprocess.Popen) -> float:
    """Seconds from SIGTERM to exit of the manager with 8 sessions open."""
    sessions = [await open_session(port, False) for _ in range(8)]
    t0 = time.perf_counter()
    manager.send_signal(signal.SIGTERM)
    await asyncio.get_running_loop().run_in_executor(None, manager.wait)
    elapsed = time.perf_counter() - t0
    for session, _ in sessions:
        session.transport.close()
    return round(elapsed, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--single", type=int, default=2000, help="round trips, one session")
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--per-session", type=int, default=200)
    parser.add_argument("--memory", type=int, default=100_000, help="requests on one connection (0: skip)")
    args = parser.parse_args()

    python = sys.executable
    ours_dir = tempfile.mkdtemp(prefix="bus-ours-", dir="/tmp")
    relay_dir = tempfile.mkdtemp(prefix="bus-relay-", dir="/tmp")
    procs: list[subprocess.Popen] = []
    try:
        manager, line = start(
            [python, "-m", "edgellm.cli", "--log-level", "WARNING", "unit-manager",
             "--port", "0", "--runtime-dir", ours_dir],
            "listening on",
            os.path.join(ours_dir, "manager.log"),
        )
        procs.append(manager)
        ours_port = int(LISTENING.search(line).group(2))
        unit, _ = start(
            [python, "-m", "edgellm.cli", "--log-level", "WARNING", "unit", "echo",
             "--runtime-dir", ours_dir, "--max-tasks", str(args.sessions + 8)],
            "ready",
            os.path.join(ours_dir, "unit.log"),
        )
        procs.append(unit)
        relay, line = start(
            [python, os.path.join(HERE, "relay_baseline.py"), "relay", "--dir", relay_dir],
            "listening on",
            os.path.join(relay_dir, "relay.log"),
        )
        procs.append(relay)
        relay_port = int(LISTENING.search(line).group(2))
        relay_unit, _ = start(
            [python, os.path.join(HERE, "relay_baseline.py"), "unit", "--dir", relay_dir],
            "ready",
            os.path.join(relay_dir, "unit.log"),
        )
        procs.append(relay_unit)

        async def all_runs() -> dict:
            out: dict = {}
            out["relay_single"] = await run_sessions(relay_port, False, 1, args.single)
            out["single"] = await run_sessions(ours_port, True, 1, args.single)
            out["relay_concurrent"] = await run_sessions(relay_port, False, args.sessions, args.per_session)
            cpu0 = {name: cpu_seconds(p.pid) for name, p in (("manager", manager), ("unit", unit))}
            out["concurrent"] = await run_sessions(ours_port, True, args.sessions, args.per_session)
            out["concurrent"]["cpu_s"] = {
                name: round(cpu_seconds(p.pid) - cpu0[name], 2)
                for name, p in (("manager", manager), ("unit", unit))
            }
            if args.memory:
                out["memory"] = await run_memory(ours_port, manager.pid, args.memory)
            out["sigterm_exit_s"] = await sigterm_exit(ours_port, manager)
            return out

        result = asyncio.run(all_runs())
        result["ratio_single_p50"] = round(result["single"]["p50_ms"] / result["relay_single"]["p50_ms"], 2)
        result["ratio_concurrent_rps"] = round(
            result["concurrent"]["rps"] / result["relay_concurrent"]["rps"], 2)
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
