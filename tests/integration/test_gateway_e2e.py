"""End to end: three boxes (three unit managers, each with an llm unit on the tiny model, all
real processes) behind one gateway, driven with the official ``openai`` client.

Engines publish their KV events, the gateway's index follows them, the gateway routes, the
cache hits: every turn of a conversation after the first lands on the box that served the
previous turn, with at least the previous prompt's whole blocks cached; round-robin spreads
the same turns over the boxes.
"""

from __future__ import annotations

import json
import os
import tempfile

import openai
import pytest

from gateway_support import GatewayProcess, http
from manager_support import Client, ManagerProcess, UnitProcess

pytest.importorskip("torch")

MODEL = "tiny-llama"
BLOCK = 16
BOXES = ("box-a", "box-b", "box-c")


@pytest.fixture(scope="module")
def boxes(tiny_model_dir):
    """Three unit managers (own runtime dirs and port pools) with an llm unit each."""
    procs = []
    with tempfile.TemporaryDirectory(prefix="el-gw-", dir="/tmp") as root:
        try:
            managers = []
            for i, name in enumerate(BOXES):
                runtime = os.path.join(root, name)
                os.makedirs(runtime)
                low = 31000 + 500 * i  # port pools apart: each unit leases its KV ports
                manager = ManagerProcess(runtime, "--box-name", name, "--min-port", str(low),
                                         "--max-port", str(low + 200))  # fmt: skip
                procs.append(manager)
                procs.append(UnitProcess(runtime, "llm", "llm", "--model",
                                         f"{MODEL}={tiny_model_dir}", "--kv-cache-mb", "4",
                                         "--threads", "1", timeout=120))  # fmt: skip
                managers.append(manager)
            yield managers
        finally:
            for proc in reversed(procs):
                proc.stop()


@pytest.fixture(scope="module")
def gateway(boxes, tiny_model_dir):
    args = [a for m in boxes for a in ("--box", f"127.0.0.1:{m.port}")]
    with GatewayProcess(*args, "--tokenizer", f"{MODEL}={tiny_model_dir}") as gw:
        gw.wait_ready()
        yield gw


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _turn(client, messages, strategy=None, **extra):
    headers = {"routing-strategy": strategy} if strategy else None
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_headers=headers,
        **extra)  # fmt: skip
    answer = raw.parse()
    return answer, raw.headers["target-pod"]


def test_each_turn_lands_on_the_box_that_caches_its_conversation(client):
    for n, topic in enumerate(("capital of France", "sixteen tokens", "edge boxes")):
        messages = [{"role": "system", "content": f"Conversation {n}: you are a helpful assistant."}]
        previous_prompt, box = None, None
        for turn in range(4):
            messages.append({"role": "user", "content": f"Tell me about the {topic}, part {turn}."})
            answer, pod = _turn(client, messages)
            usage = answer.usage
            if previous_prompt is not None:
                assert pod == box, f"turn {turn} of conversation {n} went to {pod}, not {box}"
                whole = previous_prompt // BLOCK * BLOCK
                assert usage.prompt_tokens_details.cached_tokens >= whole, (turn, usage)
            previous_prompt, box = usage.prompt_tokens, pod
            messages.append({"role": "assistant", "content": answer.choices[0].message.content})


def test_round_robin_spreads_the_same_turns(client):
    messages = [{"role": "system", "content": "Round robin: you are a helpful assistant."}]
    pods = []
    for turn in range(6):
        messages.append({"role": "user", "content": f"Question {turn}?"})
        answer, pod = _turn(client, messages, strategy="round-robin")
        pods.append(pod)
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    assert set(pods) == {f"{box}/llm" for box in BOXES}


def test_streamed_turns_route_by_cache_too(client):
    messages = [{"role": "system", "content": "Streaming: be brief."},
                {"role": "user", "content": "What is the capital of Italy?"}]  # fmt: skip
    first, pod = _turn(client, messages)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And of France?"}]  # fmt: skip
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True})  # fmt: skip
    assert raw.headers["target-pod"] == pod
    chunks = list(raw.parse())
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // BLOCK * BLOCK


def test_the_gateways_token_ids_are_the_units(gateway, boxes):
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Ünïcödé 日本語 🎉"}, {"role": "user", "content": "x"},
              {"role": "assistant", "content": "y"}, {"role": "user", "content": "def add(a, b):"}]]
    with Client(boxes[0].port, timeout=60) as unit:
        for i, messages in enumerate(chats):
            mine = json.loads(http(gateway, "POST", "/tokenize", {"model": MODEL,
                                                                  "messages": messages})[2])
            theirs = unit.request({"request_id": f"t{i}", "work_id": "llm", "action": "tokenize",
                                   "object": "llm.tokenize",
                                   "data": {"model": MODEL, "messages": messages}})  # fmt: skip
            assert mine["tokens"] == theirs["data"]["tokens"] and mine["count"] > 10
        for prompt in ("The capital of France is", "Numbers 0 1 2 3 and punctuation ! ?"):
            mine = json.loads(http(gateway, "POST", "/tokenize", {"model": MODEL, "prompt": prompt})[2])
            theirs = unit.request({"request_id": "p", "work_id": "llm", "action": "tokenize",
                                   "object": "llm.tokenize", "data": {"model": MODEL, "prompt": prompt}})
            assert mine["tokens"] == theirs["data"]["tokens"]


def test_completions_and_usage(client):
    answer = client.completions.create(model=MODEL, prompt="The capital of France is",
                                       max_tokens=5, temperature=0, seed=1)  # fmt: skip
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage.completion_tokens <= 5 and answer.usage.prompt_tokens > 3
    again = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      max_tokens=5, temperature=0, seed=1)  # fmt: skip
    assert again.choices[0].text == answer.choices[0].text  # greedy: the same answer


def test_cache_salt_keeps_tenants_apart(client):
    messages = [{"role": "user", "content": "A salted prompt that is long enough to fill a block "
                                            "or two of sixteen tokens each, surely."}]
    first, pod = _turn(client, messages, extra_body={"cache_salt": "tenant-a"})
    same, _ = _turn(client, messages, extra_body={"cache_salt": "tenant-a"})
    other, _ = _turn(client, messages, extra_body={"cache_salt": "tenant-b"})
    assert same.usage.prompt_tokens_details.cached_tokens >= BLOCK
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_context_and_max_tokens_checked_against_the_model(gateway):
    long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}
    status, _, body = http(gateway, "POST", "/v1/chat/completions", long)
    assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"
    big = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1020}
    status, _, body = http(gateway, "POST", "/v1/chat/completions", big)
    assert status == 400 and json.loads(body)["error"]["param"] == "max_tokens"
    bad_ids = {"model": MODEL, "prompt": [10**6], "max_tokens": 2}
    status, _, body = http(gateway, "POST", "/v1/completions", bad_ids)
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_metrics_count_tokens_and_decisions(gateway, client):
    _turn(client, [{"role": "user", "content": "count me"}])
    text = http(gateway, "GET", "/metrics")[2].decode()
    assert f'edgellm_gateway_prompt_tokens_total{{model="{MODEL}"}}' in text
    assert 'edgellm_gateway_routing_decisions_total{backend="box-' in text
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        for box in BOXES:
            assert f'{gauge}{{backend="{box}/llm",model_name="{MODEL}"}}' in text
    for box in BOXES:
        assert f'kvcache_zmq_connection_status{{pod_key="{box}/llm"}} 1.0' in text


def test_two_boxes_with_one_name_stay_two_backends(tiny_model_dir):
    """Boxes from one image keep one host name: their units' pod keys collide; the gateway
    keeps them apart (and follows each one's KV events under its own key)."""
    procs = []
    with tempfile.TemporaryDirectory(prefix="el-gw2-", dir="/tmp") as root:
        try:
            for i in range(2):
                runtime = os.path.join(root, f"twin{i}")
                os.makedirs(runtime)
                procs.append(ManagerProcess(runtime, "--box-name", "twin", "--min-port",
                                            str(32600 + 200 * i), "--max-port", str(32800 + 200 * i)))
                procs.append(UnitProcess(runtime, "llm", "llm", "--model", f"{MODEL}={tiny_model_dir}",
                                         "--kv-cache-mb", "4", "--threads", "1", timeout=120))
            ports = [p.port for p in procs if isinstance(p, ManagerProcess)]
            with GatewayProcess("--box", f"127.0.0.1:{ports[0]}", "--box", f"127.0.0.1:{ports[1]}",
                                "--tokenizer", f"{MODEL}={tiny_model_dir}") as gw:
                health = json.loads(http(gw, "GET", "/health")[2])
                assert sorted(health["backends"]) == sorted(["twin/llm", f"127.0.0.1:{ports[1]}/llm"]) \
                    or sorted(health["backends"]) == sorted(["twin/llm", f"127.0.0.1:{ports[0]}/llm"])
                assert all(b["ready"] for b in health["backends"].values())
                body = {"model": MODEL, "messages": [{"role": "user", "content": "twins"}], "max_tokens": 2}
                pods = {http(gw, "POST", "/v1/chat/completions", body,
                             {"routing-strategy": "round-robin"})[1]["target-pod"] for _ in range(4)}
                assert pods == set(health["backends"])
                metrics = http(gw, "GET", "/metrics")[2].decode()
                for key in health["backends"]:
                    assert f'kvcache_zmq_connection_status{{pod_key="{key}"}} 1.0' in metrics
        finally:
            for proc in reversed(procs):
                proc.stop()
