"""Tenants through the gateway (vLLM's ``cache_salt``), end to end with real processes: a
box (unit manager + llm unit on the tiny model), the gateway routing by prefix cache, and
``kv-events`` following the box's KV events (what another gateway's router would read).

A tenant's cached prefix is invisible to everyone else: another salt, or none, gets no
cached tokens from it - so its prefill computes the whole prompt, and there is no timing
difference to observe either; and the tenant's blocks are never published as KV events, so
no index, and no router choosing a ``target-pod`` from one, learns them. The tenant itself
still reuses its own prefix.
"""

from __future__ import annotations

import json
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
PROMPT = ("A tenant's private system prompt, long enough to fill several blocks of sixteen "
          "tokens each: the capital of France is Paris, the capital of Italy is Rome.")  # fmt: skip


class _Endpoint:
    def __init__(self, url: str):
        self.host, port = url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)


@pytest.fixture(scope="module")
def fabric(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="el-ten-", dir="/tmp") as runtime:
        manager = ManagerProcess(runtime, "--box-name", "box", "--min-port", "33800",
                                 "--max-port", "33900")  # fmt: skip
        procs: list = [manager]
        try:
            procs.append(UnitProcess(runtime, "llm", "llm", "--model", f"{MODEL}={tiny_model_dir}",
                                     "--kv-cache-mb", "4", "--threads", "1", timeout=120))
            kv = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING",
                                   "kv-events", "--unit-registry", runtime, "--http-port", "0",
                                   "--poll-interval", "0.2"], stdout=subprocess.PIPE, bufsize=0)
            try:
                line = _read_line_until(kv, "listening on", 60)
                score = _Endpoint(line.split("listening on ")[1].strip())
                with GatewayProcess("--box", f"127.0.0.1:{manager.port}", "--tokenizer",
                                    f"{MODEL}={tiny_model_dir}") as gw:  # fmt: skip
                    yield gw, score
            finally:
                kv.terminate()
                kv.wait(30)
                kv.stdout.close()
        finally:
            for proc in reversed(procs):
                proc.stop()


def _messages(prompt: str) -> list[dict[str, str]]:
    # the prompt as the system message: no template text ahead of it that every chat shares,
    # so two prompts share no block unless their texts begin alike
    return [{"role": "system", "content": prompt}, {"role": "user", "content": "Well?"}]


def _ask(client, salt: str | None, prompt: str) -> tuple[int, str]:
    extra = {"cache_salt": salt} if salt else {}
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=_messages(prompt), max_tokens=1, temperature=0,
        extra_body=extra)  # fmt: skip
    return raw.parse().usage.prompt_tokens_details.cached_tokens, raw.headers["target-pod"]


def _indexed_blocks(gateway, score, prompt: str) -> int:
    """Blocks of ``prompt`` (as the engine tokenises the chat) the KV event index holds."""
    ids = json.loads(http(gateway, "POST", "/tokenize", {
        "model": MODEL, "messages": _messages(prompt)})[2])["tokens"]
    status, _, body = http(score, "POST", "/v1/score", {"model": MODEL, "token_ids": ids})
    assert status == 200, body
    return max((p["matched_blocks"] for p in json.loads(body)["pods"].values()), default=0)


def _wait_indexed(gateway, score, prompt: str, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := _indexed_blocks(gateway, score, prompt)) == 0:
        assert time.monotonic() < deadline, f"{prompt!r} never reached the index"
        time.sleep(0.1)
    return n


def test_another_tenant_or_none_gets_no_cached_tokens(fabric):
    gateway, _ = fabric
    prompt = "Another tenant's " + PROMPT  # shares no block with the other test's prompts
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as client:
        assert _ask(client, "tenant-a", prompt)[0] == 0
        assert _ask(client, "tenant-a", prompt)[0] >= 2 * BLOCK  # its own prefix, reused
        for salt in ("tenant-b", "tenant-a ", None):
            assert _ask(client, salt, prompt)[0] == 0, salt  # the whole prompt computed


def test_a_salted_prefix_never_reaches_an_index_or_a_router(fabric):
    gateway, score = fabric
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as client:
        _ask(client, "tenant-a", PROMPT)
        _ask(client, "tenant-a", PROMPT)
        # a fence: an unsalted prompt after it, from the same engine; once its blocks are
        # indexed, every event published before them has been applied
        fence = "Public text of nobody in particular, " + PROMPT
        _ask(client, None, fence)
        assert _wait_indexed(gateway, score, fence) >= 2
        assert _indexed_blocks(gateway, score, PROMPT) == 0
        # the same prompt unsalted is published: the index would have shown a leak
        _ask(client, None, PROMPT)
        assert _wait_indexed(gateway, score, PROMPT) >= 2
