"""Where backends come from (flags, files, Kubernetes pods) and what an HTTP engine's answers
mean (its errors, its vLLM gauges)."""

from __future__ import annotations

import json

import pytest

from edgellm.discovery.pod import Pod
from edgellm.gateway.backend import BackendUnavailable, ModelInfo, RequestRefused
from edgellm.gateway.openai_http import _loads, _refusal
from edgellm.gateway.specs import (
    BoxSpec,
    EngineSpec,
    SpecError,
    parse_backends,
    parse_box,
    parse_engine,
    spec_from_pod,
)


def test_boxes():
    assert parse_box("10.0.0.2:10002") == BoxSpec("10.0.0.2", 10002)
    assert parse_box("edge-7") == BoxSpec("edge-7", 10001)
    assert parse_box("[::1]:9") == BoxSpec("::1", 9)
    for bad in ("", ":5", "h:0", "h:99999", "h:x"):
        with pytest.raises(SpecError):
            parse_box(bad)


def test_engines():
    spec = parse_engine("http://10.0.0.5:8000/,pub_port=5557,pod_key=ns/vllm-0,model=a,model=b")
    assert spec == EngineSpec("http://10.0.0.5:8000", "ns/vllm-0", None, 5557, None, None, ("a", "b"))
    pod = spec.kv_pod("a")
    assert (pod.pod_key, pod.ip, pod.model, pod.pub_port, pod.router_port) == (
        "ns/vllm-0", "10.0.0.5", "a", 5557, 5558)  # fmt: skip
    assert parse_engine("https://e").kv_pod("a") is None  # no event ports given: not followed
    assert parse_engine("http://e:1,kv_host=10.1.1.1,pub_port=7").kv_pod("m").ip == "10.1.1.1"
    for bad in ("ftp://x", "http://", "http://e,pub_port=0", "http://e,nonsense", "http://e,colour=red",
                "http://e,block_size=0"):  # fmt: skip
        with pytest.raises(SpecError):
            parse_engine(bad)


def test_backends_files():
    specs = parse_backends("- {box: '127.0.0.1:10001'}\n- {url: 'http://h:8000', pub_port: 5557}\n")
    assert specs == [BoxSpec("127.0.0.1", 10001), EngineSpec("http://h:8000", pub_port=5557)]
    assert parse_backends(json.dumps([{"box": "b"}]), as_json=True) == [BoxSpec("b")]
    assert parse_backends("[]") == []
    for bad in ("{}", "- 3", "- {box: b, url: 'http://x'}", "- {url: 'http://x', models: 3}", "- ["):
        with pytest.raises(SpecError):
            parse_backends(bad)


def test_pods_become_backends():
    labels = {"model.aibrix.ai/kv-events-enabled": "true", "model.aibrix.ai/name": "llama"}
    pod = Pod("ns/p", "10.0.0.9", "llama", labels=labels)
    assert spec_from_pod(pod) == EngineSpec("http://10.0.0.9:8000", "ns/p", "10.0.0.9", 5557, 5558,
                                            models=("llama",))  # fmt: skip
    box = Pod("ns/q", "10.0.0.8", "llama", annotations={"serving.edgellm.io/protocol": "stackflow"})
    assert spec_from_pod(box) == BoxSpec("10.0.0.8", 10001)
    other = Pod("ns/r", "fd00::1", "llama", annotations={"serving.edgellm.io/port": "9000"})
    assert spec_from_pod(other).url == "http://[fd00::1]:9000"
    assert spec_from_pod(Pod("ns/s", "1.1.1.1", "m", phase="Pending")) is None
    assert spec_from_pod(Pod("ns/t", "1.1.1.1", "m", annotations={"serving.edgellm.io/port": "x"})) is None


def test_engine_refusals():
    body = json.dumps({"error": {"message": "too long", "type": "invalid_request_error",
                                 "param": "messages", "code": "context_length_exceeded"}}).encode()
    refused = _refusal("e", 400, body)
    assert isinstance(refused, RequestRefused) and (refused.status, refused.code, refused.param) == (
        400, "context_length_exceeded", "messages")  # fmt: skip
    assert isinstance(_refusal("e", 404, b'{"detail": "x"}'), RequestRefused)
    for status in (429, 500, 503):
        assert isinstance(_refusal("e", status, b"<html>"), BackendUnavailable)


def test_engine_gauges_are_summed_per_model():
    text = """
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="a"} 2.0
vllm:num_requests_running{engine="1",model_name="a"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="a"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="a"} 0.25
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="other"} 7.0
"""
    loads = _loads(text, {"a": ModelInfo("a")})
    assert list(loads) == ["a"]
    assert (loads["a"].running, loads["a"].waiting, loads["a"].kv_cache_usage) == (5, 1, 0.25)
