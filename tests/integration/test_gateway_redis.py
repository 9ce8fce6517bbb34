"""A gateway that reads a shared Redis index instead of following KV events itself: two
``edgellm kv-events --redis-url`` processes (one per box, as on two machines) feed one
Redis; the gateway routes a conversation by it to the box caching it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import openai
import pytest

from gateway_support import GatewayProcess, http
from manager_support import ManagerProcess, UnitProcess, _read_line_until

pytest.importorskip("torch")

MODEL = "tiny-llama"
BLOCK = 16


def _eventually_scored(scorer: str, tokens: list[int], pod: str, timeout: float = 20.0) -> None:
    """Wait until the shared index holds ``tokens``' blocks for ``pod``."""
    import urllib.request

    body = json.dumps({"model": MODEL, "token_ids": tokens}).encode()
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(urllib.request.Request(scorer + "/v1/score", body)) as resp:
            if pod in json.loads(resp.read())["pods"]:
                return
        assert time.monotonic() < deadline, f"{pod} never scored"
        time.sleep(0.05)


def test_routing_by_a_shared_redis_index(redis_server, tiny_model_dir):
    procs: list = []
    with tempfile.TemporaryDirectory(prefix="el-gwr-", dir="/tmp") as root:
        try:
            ports = []
            for i, name in enumerate(("red-a", "red-b")):
                runtime = os.path.join(root, name)
                os.makedirs(runtime)
                manager = ManagerProcess(runtime, "--box-name", name, "--min-port",
                                         str(34000 + 200 * i), "--max-port", str(34200 + 200 * i))
                procs.append(manager)
                procs.append(UnitProcess(runtime, "llm", "llm", "--model", f"{MODEL}={tiny_model_dir}",
                                         "--kv-cache-mb", "4", "--threads", "1", timeout=120))
                follower = subprocess.Popen(
                    [sys.executable, "-m", "edgellm.cli", "kv-events", "--unit-registry", runtime,
                     "--redis-url", redis_server.url, "--http-port", "0", "--poll-interval", "0.2"],
                    stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
                procs.append(follower)
                scorer = _read_line_until(follower, "listening on", 60).split()[-1].strip()
                ports.append(manager.port)
            with GatewayProcess("--box", f"127.0.0.1:{ports[0]}", "--box", f"127.0.0.1:{ports[1]}",
                                "--redis-url", redis_server.url,
                                "--tokenizer", f"{MODEL}={tiny_model_dir}") as gw:
                with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
                    def turn(messages, strategy):
                        raw = client.chat.completions.with_raw_response.create(
                            model=MODEL, messages=messages, max_tokens=6, temperature=0,
                            extra_headers={"routing-strategy": strategy})  # fmt: skip
                        return raw.parse(), raw.headers["target-pod"]

                    # round-robin puts the first turn on red-b (its first pick was red-a): with
                    # both idle, least-loaded would prefer red-a, so only the index says red-b
                    turn([{"role": "user", "content": "warm-up"}], "round-robin")
                    messages = [{"role": "system", "content": "Shared index: be helpful."},
                                {"role": "user", "content": "Turn 0, tell me more."}]  # fmt: skip
                    answer, pod = turn(messages, "round-robin")
                    assert pod == "red-b/llm"
                    for n in range(1, 3):
                        ids = json.loads(http(gw, "POST", "/tokenize", {"model": MODEL,
                                                                        "messages": messages})[2])
                        _eventually_scored(scorer, ids["tokens"], "red-b/llm")
                        previous = answer.usage.prompt_tokens
                        messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                                     {"role": "user", "content": f"Turn {n}, tell me more."}]
                        answer, pod = turn(messages, "prefix-cache")
                        assert pod == "red-b/llm"
                        cached = answer.usage.prompt_tokens_details.cached_tokens
                        assert cached >= previous // BLOCK * BLOCK
                metrics = http(gw, "GET", "/metrics")[2].decode()
                assert "kvcache_zmq_connection_status{" not in metrics  # nothing followed here
                assert 'reason="prefix-match"' in metrics
        finally:
            for proc in reversed(procs):
                if isinstance(proc, subprocess.Popen):
                    proc.terminate()
                    proc.wait(30)
                    proc.stdout.close()
                else:
                    proc.stop()
