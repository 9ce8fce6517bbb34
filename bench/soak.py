"""Soak: mixed traffic through the front door and the gateway for a bounded time, with
clients connecting, leaving mid-stream and sending bad input; memory and file descriptors
of every process after warm-up and at the end.

    .venv/bin/python bench/soak.py [--minutes 5] [--tiny] [--kv-cache-mb 24]

The fabric as processes (``bench/_stack.py``): the unit manager, the llm unit (the real
default model, one thread; ``--tiny``: the tests' tiny model, for a quick run), the echo unit,
the gateway. Clients (``bench/_soak_traffic.py``), all at once: StackFlow sessions on the llm
and echo units, OpenAI chats through the gateway (streamed and not), bad input on both.

Warm-up: the same traffic until the engine's block cache is full (its ``stats``: every block
holding a cached prefix) and at least a fifth of the time has passed; then the baseline RSS
and open file descriptors of each process; the traffic goes on until ``--minutes`` in all,
stops, and after a few seconds of quiet each process is read again. Targets: no error (bad
inputs answered as errors are counted apart), RSS growth under 5 MB for the unit manager and
the gateway and under 2% for the llm unit, no file descriptor more.

Last line: one JSON object (``"ok"`` when the targets hold); exit status 1 if not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from _soak_traffic import Door, Tally, bad_input, echo_sessions, llm_sessions, openai_chats  # noqa: E402
from _stack import Stack  # noqa: E402

MB = 1 << 20
SETTLE_S = 5.0


def reading(stack: Stack) -> dict[str, dict[str, int]]:
    out = {}
    for name, proc in stack.procs.items():
        p = psutil.Process(proc.pid)
        out[name] = {"rss": p.memory_info().rss, "fds": p.num_fds()}
    return out


def cache_full(stack: Stack) -> tuple[bool, dict]:
    """The llm unit's block cache: full when 95% of its blocks hold cached prefixes."""
    door = Door(stack.front_door, timeout=30)
    try:
        door.send({"request_id": "stats", "work_id": "llm", "action": "stats"})
        data = next(iter(door.answer()["data"].values()))
    finally:
        door.close()
    return data["num_cached_blocks"] >= 0.95 * data["num_blocks"], data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model")
    parser.add_argument("--kv-cache-mb", type=float, default=None,
                        help="the llm unit's block pool (default: 24, tiny: 1)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="el-soak-", dir="/tmp")
    model, kv_mb = None, args.kv_cache_mb or 24
    if args.tiny:
        from tiny_llm import build_tiny_model

        model = f"tiny={build_tiny_model(os.path.join(work, 'tiny'))}"
        kv_mb = args.kv_cache_mb or 1
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    stack = Stack(work, model=model, kv_cache_mb=kv_mb, threads=1)
    tally = Tally()
    tally.model = stack.models[0]
    try:
        workers = [
            threading.Thread(target=llm_sessions, args=(stack.front_door, end, tally, args.seed)),
            threading.Thread(target=llm_sessions, args=(stack.front_door, end, tally, args.seed + 1)),
            threading.Thread(target=echo_sessions, args=(stack.front_door, end, tally, args.seed)),
            threading.Thread(target=openai_chats, args=(stack.url, end, tally, args.seed),
                             kwargs={"stream": False}),
            threading.Thread(target=openai_chats, args=(stack.url, end, tally, args.seed),
                             kwargs={"stream": True}),
            threading.Thread(target=bad_input, args=(stack.front_door, stack.url, end, tally,
                                                     args.seed)),
        ]  # fmt: skip
        for w in workers:
            w.start()
        warm_until = t0 + (end - t0) / 5
        full, stats = False, {}
        while time.monotonic() < end - 10:
            full, stats = cache_full(stack)
            if full and time.monotonic() >= warm_until:
                break
            time.sleep(2)
        warm = reading(stack)
        warm_at = time.monotonic() - t0
        print(f"warm after {warm_at:.0f}s (cache full: {full}, {stats}): "
              f"{json.dumps(warm)}", flush=True)
        for w in workers:
            w.join()
        time.sleep(SETTLE_S)  # answers in flight, sessions closing, idle tasks
        final = reading(stack)
        alive = stack.alive()
    finally:
        stack.close()
    growth = {name: {"rss_mb": round((final[name]["rss"] - warm[name]["rss"]) / MB, 2),
                     "rss_pct": round(100 * (final[name]["rss"] / warm[name]["rss"] - 1), 2),
                     "fds": final[name]["fds"] - warm[name]["fds"]}
              for name in final}  # fmt: skip
    traffic = tally.summary()
    out = {"minutes": args.minutes, "model": tally.model, "warm_at_s": round(warm_at),
           "cache_full": full, **{k: traffic[k] for k in ("requests", "errors",
                                                          "bad_inputs_answered", "disconnects")},
           "per_kind": traffic["kinds"], "warm": warm, "final": final, "growth": growth,
           "alive": alive, "examples": traffic["examples"], "work_dir": work}  # fmt: skip
    out["ok"] = bool(
        traffic["errors"] == 0 and full and all(alive.values())
        and all(growth[n]["rss_mb"] < 5 for n in ("manager", "gateway"))
        and growth["llm"]["rss_pct"] < 2 and all(g["fds"] <= 0 for g in growth.values())
    )
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
