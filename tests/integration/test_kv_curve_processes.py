"""CURVE across the product's own processes: an llm unit publishing with a keypair and a
directory of allowed subscribers (``--kv-curve-secret``, ``--kv-curve-clients``), the gateway
and ``kv-events`` subscribing with a keypair of their own and the unit's public key
(``--kv-curve-secret``, ``--kv-curve-server-key``): a generation's blocks reach both;
a ``kv-events`` without keys, on the same discovery, gets nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time

import pytest

from edgellm.comm.curve import create_keypair
from gateway_support import GatewayProcess, http
from manager_support import ManagerProcess, UnitProcess, _read_line_until

pytest.importorskip("torch")

MODEL = "tiny-llama"


class _Endpoint:
    def __init__(self, line: str):
        self.host, port = line.split("listening on http://")[1].strip().rsplit(":", 1)
        self.port = int(port)


def _kv_events(runtime: str, *keys: str) -> tuple[subprocess.Popen, _Endpoint]:
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING",
                             "kv-events", "--unit-registry", runtime, "--http-port", "0",
                             "--poll-interval", "0.2", *keys], stdout=subprocess.PIPE, bufsize=0)
    return proc, _Endpoint(_read_line_until(proc, "listening on", 60))


def _matched(score: _Endpoint, ids: list[int]) -> int:
    status, _, body = http(score, "POST", "/v1/score", {"model": MODEL, "token_ids": ids})
    assert status == 200, body
    return max((p["matched_blocks"] for p in json.loads(body)["pods"].values()), default=0)


def test_only_keyed_subscribers_follow_a_keyed_unit(tiny_model_dir, tmp_path):
    server_pub, server_secret = create_keypair(str(tmp_path / "unit"), "unit")
    _, client_secret = create_keypair(str(tmp_path / "fleet"), "gateway")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "gateway.key").write_bytes((tmp_path / "fleet" / "gateway.key").read_bytes())
    keys = ("--kv-curve-secret", client_secret, "--kv-curve-server-key", server_pub)
    with tempfile.TemporaryDirectory(prefix="el-curve-", dir="/tmp") as runtime:
        manager = ManagerProcess(runtime, "--min-port", "34000", "--max-port", "34100")
        procs: list = [manager]
        kvs: list[subprocess.Popen] = []
        try:
            procs.append(UnitProcess(runtime, "llm", "llm", "--model", f"{MODEL}={tiny_model_dir}",
                                     "--kv-cache-mb", "4", "--threads", "1", "--kv-curve-secret",
                                     server_secret, "--kv-curve-clients", str(allowed),
                                     timeout=120))  # fmt: skip
            keyed, keyed_score = _kv_events(runtime, *keys)
            kvs.append(keyed)
            plain, plain_score = _kv_events(runtime)
            kvs.append(plain)
            gateway = GatewayProcess("--box", f"127.0.0.1:{manager.port}", "--tokenizer",
                                     f"{MODEL}={tiny_model_dir}", *keys)  # fmt: skip
            procs.append(gateway)
            body = {"model": MODEL, "prompt": "The capital of France is Paris. " * 6,
                    "max_tokens": 1}  # fmt: skip
            assert http(gateway, "POST", "/v1/completions", body)[0] == 200
            ids = json.loads(http(gateway, "POST", "/tokenize", {"model": MODEL,
                                                                 "prompt": body["prompt"]})[2])["tokens"]
            deadline = time.monotonic() + 30
            while _matched(keyed_score, ids) < 2:
                assert time.monotonic() < deadline, "the keyed kv-events never got the blocks"
                time.sleep(0.1)
            metrics = http(gateway, "GET", "/metrics")[2].decode()
            stored = re.findall(r'kvcache_zmq_events_processed_total\{event_type="BlockStored",'
                                r'pod_key="[^"]+"\} (\S+)', metrics)  # fmt: skip
            assert stored and float(stored[0]) > 0  # the gateway's own index follows too
            time.sleep(2.0)  # the plain one had every chance: replays, probes, reconnects
            assert _matched(plain_score, ids) == 0
        finally:
            for proc in kvs:
                proc.terminate()
                proc.wait(30)
                proc.stdout.close()
            for proc in reversed(procs):
                proc.stop()
