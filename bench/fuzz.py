"""Coverage-guided fuzzing of every parser, the index's C extension under AddressSanitizer,
and schema-driven runs of both HTTP APIs against live processes.

    .venv/bin/python bench/fuzz.py [--runs 1000000] [--rows-runs 300000] [--http-cases 10000]
                                   [--only framer,kv_events,params,gateway,rows,http] [--seed 1]

- parsers (``bench/_fuzz_targets.py``, atheris/libFuzzer, each in a process of its own):
  ``framer`` (the TCP front door: framing + the dispatcher's envelope checks), ``kv_events``
  (the KV event batch decoder), ``params`` (set_param packing), ``gateway`` (the gateway's
  request bodies as its handlers parse them): ``--runs`` inputs each;
- ``rows``: the C extension built with ``-fsanitize=address,fuzzer-no-link`` against a model
  of its contract (``bench/_fuzz_rows.py``); first a build with a planted one-byte heap
  overflow, which must be reported (the sanitizer is live), then the real one. Skipped,
  saying why, without clang (``make asan-deps``);
- ``http``: a unit manager, an llm unit on the tiny model, the gateway and kv-events as
  processes (``bench/_stack.py``), then ``--http-cases`` schemathesis cases against each API
  (``bench/_fuzz_http.py``); the processes must still run and have logged no traceback.

Counts per part: inputs or cases, crashes, hangs (an input over 1 s, twice), answers of
status 500. Last line: one JSON object, ``"ok": true`` when every part ran its count with
nothing found; exit status 1 if not. Inputs that crashed or hung are kept in the work
directory printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import _fuzz_asan  # noqa: E402

PARSERS = ("framer", "kv_events", "params", "gateway")
_COVERAGE = re.compile(r"DONE\s+cov: (\d+)")


def run_target(name: str, runs: int, work: str, *, seed: int = 1, so: str | None = None,
               timeout: float = 7200) -> dict:  # fmt: skip
    """One target in a child process; its stats plus crashes seen from outside."""
    stats = os.path.join(work, f"{name}{'-broken' if so and 'broken' in so else ''}.json")
    cmd = [sys.executable, os.path.join(HERE, "_fuzz_run.py"), name, "--runs", str(runs),
           "--stats", stats, "--seed", str(seed)]  # fmt: skip
    if so:
        cmd += ["--rows-so", so]
    env = _fuzz_asan.env() if so else None
    t0 = time.monotonic()
    with open(stats + ".log", "w") as log:
        try:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout)  # fmt: skip
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    with open(stats + ".log", errors="replace") as log:
        text = log.read()
    try:
        with open(stats) as f:
            out = json.load(f)
    except (OSError, ValueError):
        out = {"target": name, "inputs": 0, "crashes": 0, "hangs": 0}
    coverage = _COVERAGE.findall(text)
    out["coverage"] = int(coverage[-1]) if coverage else None
    out["exit"] = code
    out["asan_reports"] = text.count("ERROR: AddressSanitizer")
    if code != 0:
        out["crashes"] = max(1, out.get("crashes", 0))
        out["crash_log"] = stats + ".log"
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out


def run_rows(runs: int, work: str, seed: int) -> dict:
    reason = _fuzz_asan.missing()
    if reason:
        return {"skipped": reason}
    canary = run_target("rows", 200_000, work, seed=seed,
                        so=_fuzz_asan.build(work, broken=True))  # fmt: skip
    out = run_target("rows", runs, work, seed=seed, so=_fuzz_asan.build(work))
    out["sanitizer_live"] = canary["asan_reports"] > 0
    return out


def run_http(cases: int, work: str, seed: int) -> dict:
    from _fuzz_http import run_api
    from _stack import Stack
    from tiny_llm import build_tiny_model

    model = build_tiny_model(os.path.join(work, "tiny"))
    stack = Stack(os.path.join(work, "stack"), model=f"tiny={model}", max_model_len=64,
                  kv_cache_mb=4, kv_events=True, api_key="fuzz-key",
                  gateway_args=("--tokenizer", f"tiny={model}"))  # fmt: skip
    try:
        out = {"gateway": run_api(stack.url, cases, headers=stack.headers, models=stack.models,
                                  seed_value=seed),
               "kv_events": run_api(stack.kv_url, cases, headers=stack.headers,
                                    models=stack.models, seed_value=seed)}  # fmt: skip
        alive = stack.alive()
    finally:
        stack.close()
    for name in ("gateway", "kv_events"):
        out[name]["alive"] = alive[name]
        out[name]["tracebacks"] = stack.log_text(name).count("Traceback")
    return out


def _part_ok(part: dict, want: int) -> bool:
    return part.get("inputs", 0) >= want and part.get("crashes") == 0 and part.get("hangs") == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per parser")
    parser.add_argument("--rows-runs", type=int, default=300_000, help="inputs of the ASan run")
    parser.add_argument("--http-cases", type=int, default=10_000, help="cases per HTTP API")
    parser.add_argument("--only", default="", help="comma-separated parts (default: all)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    parts = set(args.only.split(",")) if args.only else {*PARSERS, "rows", "http"}
    work = tempfile.mkdtemp(prefix="el-fuzz-", dir="/tmp")
    result: dict = {"work_dir": work}
    ok = True
    for name in PARSERS:
        if name in parts:
            result[name] = run_target(name, args.runs, work, seed=args.seed)
            ok &= _part_ok(result[name], args.runs)
            print(f"{name}: {json.dumps(result[name])}", flush=True)
    if "rows" in parts:
        result["rows_asan"] = run_rows(args.rows_runs, work, args.seed)
        if "skipped" not in result["rows_asan"]:
            ok &= _part_ok(result["rows_asan"], args.rows_runs)
            ok &= result["rows_asan"]["sanitizer_live"] and result["rows_asan"]["asan_reports"] == 0
        print(f"rows (ASan): {json.dumps(result['rows_asan'])}", flush=True)
    if "http" in parts:
        http = run_http(args.http_cases, work, args.seed)
        result["http"] = http
        for name, part in http.items():
            ok &= (part["cases"] >= args.http_cases and part["status_500"] == 0
                   and part["transport_errors"] == 0 and part["bad_error_shape"] == 0
                   and part["alive"] and part["tracebacks"] == 0)  # fmt: skip
            print(f"http {name}: {json.dumps(part)}", flush=True)
    result["ok"] = bool(ok)
    print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
