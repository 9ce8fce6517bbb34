"""The llm unit's KV events, followed by ``edgellm kv-events`` exactly as vLLM's are: after
real traffic (evictions included), what the index holds for the unit's pod equals, block for
block, what the engine's prefix cache holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.request

import pytest

from edgellm.discovery.unit_registry import UnitRegistryPodProvider
from edgellm.engine import EngineConfig
from edgellm.engine.block_hash import BlockHasher
from edgellm.kvevents.config import ManagerConfig
from edgellm.kvevents.manager import KVEventManager
from edgellm.unit import UnitConfig
from edgellm.units.llm import LlmUnit, LlmUnitConfig
from kvfakes.reference_index import ReferenceIndex
from waits import wait_until
from manager_support import Client, ManagerProcess

pytest.importorskip("torch")

BLOCK_BYTES = 2 * 2 * 16 * 16 * 2 * 4  # tiny model: layers x KV heads x dims x tokens x K,V x fp32
SYSTEM = "You are a helpful assistant. Answer briefly and politely. " * 3


def _score(base: str, model: str, tokens: list[int]) -> dict[str, int]:
    body = json.dumps({"model": model, "token_ids": tokens}).encode()
    req = urllib.request.Request(base + "/v1/score", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        pods = json.loads(resp.read())["pods"]
    return {k: v["matched_blocks"] for k, v in pods.items() if v["matched_blocks"]}


def _engine_truth(unit: LlmUnit, tokens: list[int]) -> int:
    engine = unit.engine
    hasher = BlockHasher(engine.pool.block_size, engine._root)
    hasher.extend(tokens)
    return len(engine.pool.lookup(hasher.hashes))


def test_the_index_follows_the_engine_block_for_block(tiny_model):
    with tempfile.TemporaryDirectory(prefix="el-kv-", dir="/tmp") as runtime_dir, \
            ManagerProcess(runtime_dir, "--box-name", "box-a") as manager:  # fmt: skip
        unit = LlmUnit(UnitConfig(name="llm", runtime_dir=runtime_dir),
                       LlmUnitConfig(tiny_model, EngineConfig(kv_cache_bytes=14 * BLOCK_BYTES,
                                                              prefill_chunk=32, threads=1)))  # fmt: skip
        reference = ReferenceIndex()
        provider = UnitRegistryPodProvider(runtime_dir=runtime_dir, poll_interval=0.2)
        followers = KVEventManager(provider, reference, config=ManagerConfig(enabled=True))
        kv_events = None
        with unit:
            pod = unit.pod_key
            assert pod == "box-a/llm"
            provider.start()
            followers.start()
            kv_events = subprocess.Popen(
                [sys.executable, "-m", "edgellm.cli", "kv-events", "--unit-registry", runtime_dir,
                 "--http-port", "0", "--poll-interval", "0.2"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
            try:
                line = kv_events.stdout.readline()
                assert "listening on http://" in line, kv_events.stderr.read()
                base = line.strip().rsplit(" ", 1)[1]
                wait_until(lambda: followers.subscribed_pods() == [pod], 20, "a subscription")
                tokenizer = unit.engine.tokenizer
                prompts = [[{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": f"Question {i}: {'more words ' * (i % 4)}"}]
                           for i in range(10)]  # fmt: skip

                def talk(share):
                    with Client(manager.port, timeout=60) as c:
                        answer = c.request({"request_id": "s", "work_id": "llm", "action": "setup",
                                            "object": "llm.setup", "data": {
                                                "model": "tiny-llama", "enoutput": True,
                                                "response_format": "llm.utf-8.stream"}})  # fmt: skip
                        assert answer["error"]["code"] == 0, answer
                        work_id = answer["work_id"]
                        for messages in share:
                            answers = c.stream({"request_id": "r", "work_id": work_id,
                                                "action": "inference", "object": "llm.utf-8.stream",
                                                "data": {"messages": messages, "max_tokens": 40,
                                                         "ignore_eos": True}})  # fmt: skip
                            assert answers[-1]["error"]["code"] == 0, answers[-1]
                            assert answers[-1]["data"]["finish"] is True

                threads = [threading.Thread(target=talk, args=(prompts[i::2],)) for i in range(2)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                stats = unit.engine.stats()
                assert stats.evictions > 0, "the pool never filled: the test would prove little"
                wait_until(lambda: unit.engine.stats().num_requests_running == 0, 20, "an idle engine")
                held = set(unit.engine.pool.cached_hashes(published_only=True))
                assert held
                wait_until(lambda: {h for _, h in reference.pod_blocks(pod)} == held, 20,
                           "the followed index == the engine's cache")  # fmt: skip
                probes = [tokenizer.encode_chat(m) for m in prompts]
                truth = [_engine_truth(unit, p) for p in probes]
                assert any(truth) and len(set(truth)) > 1, truth
                wait_until(
                    lambda: [_score(base, "tiny-llama", p).get(pod, 0) for p in probes] == truth,
                    20, "kv-events' scores == the engine's cached prefixes")  # fmt: skip
            finally:
                followers.stop()
                provider.stop()
                if kv_events is not None:
                    kv_events.terminate()
                    kv_events.wait(10)
                    kv_events.stdout.close()
                    kv_events.stderr.close()
