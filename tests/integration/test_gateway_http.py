"""The gateway's HTTP surface on real processes (a unit manager, a unit, ``edgellm serve``):
the official client, streaming and not; every bad input answered in OpenAI's error shape,
and the gateway still serving after it.

The unit here is the echo unit under a lsmode entry of type ``llm``: it answers any
inference with its input and ``hello``, which is all the HTTP surface needs.
"""

from __future__ import annotations

import json
import socket

import openai
import pytest

from gateway_support import GatewayProcess, error_of, http, sse_events
from manager_support import ManagerProcess, UnitProcess

MODEL = "echo-model"


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    runtime = tmp_path_factory.mktemp("box")
    lsmod = runtime / "lsmod"
    lsmod.mkdir()
    (lsmod / "echo.json").write_text(json.dumps({
        "mode": MODEL, "type": "llm", "unit": "llm", "max_context": 256, "block_size": 16}))
    with ManagerProcess(str(runtime), "--lsmod-dir", str(lsmod)) as manager, \
            UnitProcess(str(runtime)):  # fmt: skip
        yield manager


@pytest.fixture(scope="module")
def gateway(box):
    with GatewayProcess("--box", f"127.0.0.1:{box.port}") as gw:
        yield gw


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_it_says_who_may_connect(gateway, box):
    assert gateway.started_line.startswith("gateway (loopback only; no API key) listening on")


def test_models_and_health(gateway, box):
    listing = json.loads(http(gateway, "GET", "/v1/models")[2])
    assert [m["id"] for m in listing["data"]] == [MODEL]
    assert listing["data"][0]["max_model_len"] == 256
    status, _, body = http(gateway, "GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["backends"][f"127.0.0.1:{box.port}/llm"]["models"] == [MODEL]


def test_chat_with_the_official_client_streaming_and_not(client, box):
    messages = [{"role": "user", "content": "hi"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7)
    assert answer.object == "chat.completion" and answer.model == MODEL
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    sent = json.loads(choice.message.content.removesuffix("hello"))  # echo: what the unit got
    assert sent == {"messages": messages, "max_tokens": 7}
    assert answer.usage.prompt_tokens_details.cached_tokens == 0

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("hello") and json.loads(text.removesuffix("hello"))["messages"] == messages
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert len({c.id for c in chunks}) == 1


def test_completions_with_the_official_client(client):
    answer = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0)
    assert answer.object == "text_completion"
    assert json.loads(answer.choices[0].text.removesuffix("hello")) == {
        "prompt": "abc", "max_tokens": 3, "temperature": 0.0}  # fmt: skip
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=[5, 6, 7], max_tokens=2, stream=True) if c.choices)  # fmt: skip
    assert json.loads(streamed.removesuffix("hello")) == {"prompt_token_ids": [5, 6, 7], "max_tokens": 2}


def test_request_ids_are_honoured_echoed_and_sent_on(gateway):
    status, headers, body = http(gateway, "POST", "/v1/chat/completions",
                                 {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                                 {"X-Request-Id": "trace-42"})  # fmt: skip
    assert status == 200 and headers["x-request-id"] == "trace-42" == headers["request-id"]
    assert headers["target-pod"].endswith("/llm") and headers["routing-strategy"] == "prefix-cache"
    status, headers, body = http(gateway, "GET", "/v1/models")
    assert len(headers["x-request-id"]) == 32  # made up when not given
    status, headers, body = http(gateway, "GET", "/v1/models", headers={"X-Request-Id": "a b"})
    assert status == 400 and error_of(body)["code"] == "invalid_request_id"


def test_routing_strategy_header(gateway):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    for strategy in ("least-request", "round-robin", "random", "prefix-cache"):
        status, headers, _ = http(gateway, "POST", "/v1/chat/completions", body,
                                  {"routing-strategy": strategy})  # fmt: skip
        assert status == 200 and headers["routing-strategy"] == strategy
    status, _, raw = http(gateway, "POST", "/v1/chat/completions", body, {"routing-strategy": "vibes"})
    assert status == 400 and error_of(raw)["param"] == "routing-strategy"


CHAT = "/v1/chat/completions"
BAD = [
    (CHAT, b"{not json", 400, "invalid_json"),
    (CHAT, b"[]", 400, "invalid_json"),
    (CHAT, b"\xff" * 10, 400, "invalid_json"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}]}', 400, "missing_required_parameter"),
    (CHAT, b'{"model": 3, "messages": []}', 400, "invalid_value"),
    (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                       "max_tokens": "9"}).encode(), 400, "invalid_value"),
    (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                       "max_tokens": 0}).encode(), 400, "invalid_value"),
    (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                       "max_tokens": 256}).encode(), 400, "context_length_exceeded"),
    (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                       "n": 3}).encode(), 400, "unsupported_parameter"),
    (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                       "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(),
     400, "unsupported_parameter"),
    (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                       "logprobs": True}).encode(), 400, "unsupported_parameter"),
    (CHAT, json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
     404, "model_not_found"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400,
     "unsupported_parameter"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": []}).encode(), 400, "invalid_value"),
    ("/v1/nothing", b"{}", 404, "not_found"),
]  # fmt: skip


@pytest.mark.parametrize("path, body, status, code", BAD)
def test_bad_input_is_answered_in_openai_shape_and_the_gateway_keeps_serving(
        gateway, client, path, body, status, code):  # fmt: skip
    got, headers, raw = http(gateway, "POST", path, body, {"Content-Type": "application/json"})
    assert got == status and headers["content-type"] == "application/json"
    assert error_of(raw)["code"] == code
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok"}])


def test_the_official_client_sees_the_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    assert info.value.param == "n"


def test_wrong_methods_and_raw_garbage(gateway):
    status, headers, raw = http(gateway, "GET", CHAT)
    assert status == 405 and headers["allow"] == "POST" and error_of(raw)["type"] == "invalid_request_error"
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400") and b'"error"' in answer
    assert http(gateway, "GET", "/health")[0] == 200


def test_a_client_that_sends_half_a_body_and_leaves(gateway, client):
    for _ in range(20):
        with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\"")
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok"}])


def test_metrics(gateway, client, box):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "m"}])
    text = http(gateway, "GET", "/metrics")[2].decode()
    key = f"127.0.0.1:{box.port}/llm"
    assert (f'edgellm_gateway_requests_total{{endpoint="/v1/chat/completions",model="{MODEL}",'
            f'status="200"}}') in text  # fmt: skip
    assert f'edgellm_gateway_backend_up{{backend="{key}"}} 1.0' in text
    assert f'edgellm_gateway_backend_in_flight{{backend="{key}"}} 0.0' in text
    assert f'edgellm_gateway_routing_decisions_total{{backend="{key}",reason=' in text
    assert "edgellm_gateway_time_to_first_token_seconds_bucket" in text
    assert 'edgellm_gateway_requests_total{endpoint="/v1/chat/completions",model="nope",status="404"}' not in text


def test_streamed_errors_before_the_first_piece_are_plain_http_errors(gateway):
    body = {"model": "nope", "messages": [{"role": "user", "content": "x"}], "stream": True}
    status, headers, raw = http(gateway, "POST", CHAT, body)
    assert status == 404 and headers["content-type"] == "application/json"
    assert sse_events(raw) == []


def test_api_key(box):
    with GatewayProcess("--box", f"127.0.0.1:{box.port}", "--api-key", "s3cret") as gw:
        assert "(loopback only; API key required)" in gw.started_line
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        status, headers, raw = http(gw, "POST", CHAT, body)
        assert status == 401 and error_of(raw)["code"] == "invalid_api_key"
        assert http(gw, "GET", "/metrics")[0] == 401
        assert http(gw, "GET", "/health")[0] == 200
        with openai.OpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        with openai.OpenAI(base_url=gw.url + "/v1", api_key="s3cret", max_retries=0) as c:
            assert [m.id for m in c.models.list()] == [MODEL]


def test_no_ready_backend_is_503_and_health_says_so():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        with GatewayProcess("--box", f"127.0.0.1:{port}", wait_ready=False) as gw:
            status, _, raw = http(gw, "GET", "/health")
            assert status == 503 and error_of(raw)["code"] == "no_backend_available"
            status, _, raw = http(gw, "POST", CHAT, {"model": MODEL, "messages": [
                {"role": "user", "content": "x"}]})  # fmt: skip
            assert status == 404  # the box was never reached: nobody has named the model
            assert json.loads(http(gw, "GET", "/v1/models")[2])["data"] == []
