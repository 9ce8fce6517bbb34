"""A gateway with no tokenizer of its own asks the llm unit for token ids (real processes:
a unit manager, an llm unit on the tiny model, the gateway). Found by the schema-driven
HTTP fuzzer: a request the unit refused used to be answered 501 and to mark the unit unable
to tokenize, so every client's ``/tokenize`` failed for seconds after one bad request."""

from __future__ import annotations

import json
import tempfile

import pytest

from gateway_support import GatewayProcess, error_of, http
from manager_support import ManagerProcess, UnitProcess

pytest.importorskip("torch")

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def gateway(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="el-tok-", dir="/tmp") as runtime:
        manager = ManagerProcess(runtime, "--min-port", "33400", "--max-port", "33500")
        unit = None
        try:
            unit = UnitProcess(runtime, "llm", "llm", "--model", f"{MODEL}={tiny_model_dir}",
                               "--kv-cache-mb", "4", "--threads", "1", timeout=120)  # fmt: skip
            with GatewayProcess("--box", f"127.0.0.1:{manager.port}") as gw:
                yield gw
        finally:
            if unit is not None:
                unit.stop()
            manager.stop()


def test_a_request_the_unit_refuses_is_the_clients_error_and_harms_no_other(gateway):
    good = {"model": MODEL, "prompt": "The capital of France is"}
    status, _, body = http(gateway, "POST", "/tokenize", good)
    assert status == 200, body
    expected = json.loads(body)["tokens"]
    for bad in ({"model": MODEL, "messages": []}, {"model": MODEL, "prompt": ""}):
        status, _, body = http(gateway, "POST", "/tokenize", bad)
        assert status == 400, body
        assert error_of(body)["type"] == "invalid_request_error"
        # at once, the next client is served as before
        status, _, body = http(gateway, "POST", "/tokenize", good)
        assert status == 200 and json.loads(body)["tokens"] == expected, body


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", b'{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", '
                             b'"content": "a\\ud800b"}]}'),
    ("/v1/completions", b'{"model": "%s", "max_tokens": 2, "prompt": "x", "stop": ["\\udfff"]}'),
    ("/tokenize", b'{"model": "%s", "prompt": "a\\ud800"}'),
])  # fmt: skip
def test_a_lone_surrogate_is_no_text_and_a_400(gateway, path, body):
    """Found by the fuzzer: JSON's \\u escapes can name half a character, which no tokenizer
    takes and no UTF-8 wire carries; that was a 500."""
    status, _, answer = http(gateway, "POST", path, body % MODEL.encode(),
                             headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 400 and error_of(answer)["code"] == "invalid_json", answer
    good = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2}
    assert http(gateway, "POST", "/v1/completions", good)[0] == 200
