"""Request bodies of the gateway: strict types, OpenAI's refusals, clear 400s naming the field."""

from __future__ import annotations

import json

import pytest

from edgellm.gateway import schemas
from edgellm.gateway.schemas import ChatCompletionRequest, CompletionRequest
from edgellm.httpapi import APIError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _chat(**fields) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


def _refusal(body: bytes, model=ChatCompletionRequest) -> APIError:
    with pytest.raises(APIError) as info:
        parsed = schemas.parse(body, model)
        schemas.refuse_unsupported(parsed)
        if model is ChatCompletionRequest:
            schemas.chat_messages(parsed.messages)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


def test_text_is_any_unicode_a_surrogate_pair_included():
    parsed = schemas.parse(b'{"model": "m", "messages": [{"role": "user", "content": '
                           b'"\\ud83d\\ude00 \xf0\x9f\x8e\x89"}]}', ChatCompletionRequest)
    assert parsed.messages[0].content == "\U0001f600 \U0001f389"


def test_a_plain_request_parses_with_its_fields():
    parsed = schemas.parse(_chat(max_tokens=5, temperature=0, top_p=0.5, seed=7, stop="x",
                                 stream=True, stream_options={"include_usage": True}),
                           ChatCompletionRequest)  # fmt: skip
    assert (parsed.max_tokens, parsed.temperature, parsed.top_p, parsed.seed) == (5, 0, 0.5, 7)
    assert parsed.stream and parsed.stream_options.include_usage
    assert schemas.stop_list(parsed.stop) == ["x"]
    schemas.refuse_unsupported(parsed)


@pytest.mark.parametrize("body, param, code", [
    (b"{", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (b"\xff\xfe", None, "invalid_json"),
    (b"[" * 100_000 + b"]" * 100_000, None, "invalid_json"),
    # not text (found by the fuzzer: they reached the tokenizer and the wire as 500s)
    (_chat(messages=[{"role": "user", "content": "a\ud800b"}]), None, "invalid_json"),
    (b'{"model": "m", "user": "\xed\xa0\x80", "messages": [{"role": "user", "content": "x"}]}',
     None, "invalid_json"),
    (_chat(stop=["\udfff"]), None, "invalid_json"),
    (_chat(temperature=float("nan")), None, "invalid_json"),
    (_chat(top_p=float("inf")), None, "invalid_json"),
    (_chat().replace(b'"hi"', b'"hi", "name": 1e999'), None, "invalid_json"),
    (json.dumps({"messages": CHAT["messages"]}).encode(), "model", "missing_required_parameter"),
    (_chat(messages=[]), "messages", "invalid_value"),
    (_chat(max_tokens="5"), "max_tokens", "invalid_value"),
    (_chat(max_tokens=True), "max_tokens", "invalid_value"),
    (_chat(max_tokens=0), "max_tokens", "invalid_value"),
    (_chat(max_completion_tokens=-1), "max_completion_tokens", "invalid_value"),
    (_chat(temperature=2.5), "temperature", "invalid_value"),
    (_chat(top_p=0), "top_p", "invalid_value"),
    (_chat(seed=1 << 70), "seed", "invalid_value"),
    (_chat(stream="yes"), "stream", "invalid_value"),
    (_chat(messages=[{"role": "user", "content": 3}]), "messages[0].content", "invalid_value"),
    (_chat(messages=[{"role": "user"}, "x"]), "messages[1]", "invalid_value"),
    (_chat(frobnicate=1), "frobnicate", "unrecognized_argument"),
    (_chat(stream_options={"include_usage": True, "x": 1}), "stream_options.x", "unrecognized_argument"),
])  # fmt: skip
def test_malformed_or_wrongly_typed_fields_are_400_naming_the_field(body, param, code):
    error = _refusal(body)
    assert (error.param, error.code) == (param, code), error.message
    if code == "unrecognized_argument":
        assert error.message == f"Unrecognized request argument supplied: {param}"


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"), ("logprobs", True), ("top_logprobs", 2),
    ("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("logit_bias", {"1": 5}),
    ("response_format", {"type": "json_object"}), ("functions", [{"name": "f"}]),
    ("audio", {"voice": "x"}), ("modalities", ["text", "audio"]),
])  # fmt: skip
def test_fields_we_do_not_support_are_a_clear_400(field, value):
    error = _refusal(_chat(**{field: value}))
    assert (error.param, error.code) == (field, "unsupported_parameter")
    assert "not supported" in error.message or "only" in error.message


@pytest.mark.parametrize("field, value", [
    ("n", 1), ("tools", []), ("tool_choice", "none"), ("logprobs", False), ("presence_penalty", 0),
    ("response_format", {"type": "text"}), ("user", "u"), ("metadata", {"a": "b"}),
    ("store", False), ("prompt_cache_key", "k"), ("cache_salt", "tenant-a"), ("top_k", 5),
    ("ignore_eos", True),
])  # fmt: skip
def test_neutral_values_and_metadata_are_accepted(field, value):
    schemas.refuse_unsupported(schemas.parse(_chat(**{field: value}), ChatCompletionRequest))


def test_messages_become_what_the_unit_and_templates_take():
    parsed = schemas.parse(_chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]), ChatCompletionRequest)  # fmt: skip
    assert schemas.chat_messages(parsed.messages) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""}]  # fmt: skip
    for bad, param in [
        ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages[0].content[0]"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], "messages[0]"),
    ]:  # fmt: skip
        assert _refusal(_chat(messages=bad)).param == param


def test_stop_sequences_are_bounded_and_not_empty():
    assert _refusal(_chat(stop=["s"] * 17)).param == "stop"
    assert _refusal(_chat(stop=[""])).param == "stop"
    assert _refusal(_chat(stop="")).param == "stop"


def test_completion_prompts():
    for prompt in ("text", [1, 2, 3], ["one"], [[1, 2]]):
        schemas.parse(json.dumps({"model": "m", "prompt": prompt}).encode(), CompletionRequest)
    error = _refusal(json.dumps({"model": "m", "prompt": "x", "echo": True}).encode(),
                     CompletionRequest)  # fmt: skip
    assert error.param == "echo"
    assert _refusal(json.dumps({"model": "m", "prompt": {"a": 1}}).encode(), CompletionRequest).param == "prompt"
