"""The request bodies of the OpenAI API as this gateway takes them (vLLM's shapes).

Models are strict (a number in a string, a bool for an int: 400) and closed: a field OpenAI's
API does not have is refused as OpenAI refuses it ("Unrecognized request argument
supplied"). Fields OpenAI has but this server cannot honour (``n`` > 1, tools, logprobs,
penalties, ...) are accepted by the schema and refused by :func:`refuse_unsupported` with a
400 naming the field, unless they carry their neutral value. Metadata fields (``user``,
``metadata``, ``store``, ``prompt_cache_key``...) are accepted and ignored. vLLM's extras
that the llm unit honours are taken: ``top_k``, ``ignore_eos``, ``cache_salt``.

:func:`parse` turns a body (bytes) into a model or an :class:`~edgellm.httpapi.APIError`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgellm.httpapi import APIError

MAX_STOP = 16
_U64 = 1 << 64
_decode_json = msgspec.json.Decoder().decode


class _Closed(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Closed):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None
    include_obfuscation: bool | None = None


class ChatMessage(_Closed):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None


class _Sampling(_Closed):
    """Fields shared by both generation endpoints."""

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=_U64)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: Any = None
    user: str | None = None
    # vLLM's extras the llm unit honours
    top_k: int | None = Field(default=None, ge=-1)
    ignore_eos: bool | None = None
    cache_salt: str | None = Field(default=None, min_length=1)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class TokenizeRequest(_Closed):
    """vLLM's ``POST /tokenize``: exactly one of ``prompt`` and ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(_Closed):
    model: str | None = None
    tokens: list[int]


# Fields refused unless neutral: name -> (is it neutral?, why it is refused)
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (lambda v: v in (None, 1), "only n=1 is supported"),
    "best_of": (lambda v: v in (None, 1), "only best_of=1 is supported"),
    "presence_penalty": (lambda v: not v, "penalties are not supported"),
    "frequency_penalty": (lambda v: not v, "penalties are not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "logprobs": (lambda v: v in (None, False), "logprobs are not supported"),
    "top_logprobs": (lambda v: not v, "logprobs are not supported"),
    "tools": (lambda v: not v, "tools are not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "tools are not supported"),
    "functions": (lambda v: not v, "functions are not supported"),
    "function_call": (lambda v: v in (None, "none"), "functions are not supported"),
    "response_format": (lambda v: v is None or v.get("type") == "text",
                        "only the text response format is supported"),
    "modalities": (lambda v: v is None or list(v) == ["text"], "only text output is supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    "echo": (lambda v: not v, "echo is not supported"),
    "suffix": (lambda v: not v, "suffix is not supported"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort is not supported"),
    "verbosity": (lambda v: v is None, "verbosity is not supported"),
}


Model = TypeVar("Model", bound=BaseModel)


def parse(body: bytes, model: type[Model]) -> Model:
    """``body`` (UTF-8 JSON) as ``model``; raises :class:`APIError` 400 naming the field.

    JSON as RFC 8259 has it: valid UTF-8, no lone surrogate (``"\\ud800"``: no text can
    hold it, and the tokenizer, the engine's wire and the response all fail on one), no
    ``NaN``/``Infinity``, numbers within float range."""
    try:
        value = _decode_json(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the body is not valid JSON: nested too deeply",
                       code="invalid_json") from None  # fmt: skip
    if not isinstance(value, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    except RecursionError:  # nesting deep enough to pass json but not validation
        raise APIError(400, "the body is nested too deeply", code="invalid_json") from None


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    param = _param(first.get("loc", ()))
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")  # fmt: skip
    if first["type"] == "missing":
        return APIError(400, f"'{param}' is required", param=param,
                        code="missing_required_parameter")  # fmt: skip
    where = f"'{param}': " if param else ""
    return APIError(400, f"{where}{first['msg']}", param=param, code="invalid_value")


def _param(loc: tuple) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "list[int]", "list[str]", "list[list[int]]", "none") or (
            isinstance(part, str) and part.startswith(("list[", "dict["))
        ):
            continue  # pydantic names the union branch it tried: not a field
        else:
            out += f".{part}" if out else str(part)
    return out or None


def refuse_unsupported(request: BaseModel) -> None:
    """Raise :class:`APIError` 400 for a field this server cannot honour (see the module
    docstring); ``stop`` beyond :data:`MAX_STOP` strings too."""
    for name in request.model_fields_set:
        rule = _UNSUPPORTED.get(name)
        if rule is not None and name in type(request).model_fields:
            neutral, why = rule
            if not neutral(getattr(request, name)):
                raise APIError(400, f"'{name}': {why} by this server", param=name,
                               code="unsupported_parameter")  # fmt: skip
    stop = getattr(request, "stop", None)
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise APIError(400, f"'stop': at most {MAX_STOP} sequences", param="stop",
                       code="invalid_value")  # fmt: skip
    if isinstance(stop, list) and any(not s for s in stop) or stop == "":
        raise APIError(400, "'stop': sequences must not be empty", param="stop",
                       code="invalid_value")  # fmt: skip


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The conversation as the llm unit and chat templates take it: ``[{"role", "content":
    str}]`` with ``developer`` as ``system``; text parts joined. Raises :class:`APIError`
    for tool messages, tool calls and non-text parts."""
    out = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            raise APIError(400, f"'messages[{i}].role': {message.role!r} is not supported (one "
                           f"of {', '.join(ROLES)})", param=f"messages[{i}].role",
                           code="unsupported_parameter")  # fmt: skip
        if message.tool_calls or message.function_call is not None or message.audio is not None:
            raise APIError(400, f"'messages[{i}]': tool calls and audio are not supported",
                           param=f"messages[{i}]", code="unsupported_parameter")  # fmt: skip
        content = message.content
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"'messages[{i}].content[{j}]': only text parts are "
                                   "supported", param=f"messages[{i}].content[{j}]",
                                   code="unsupported_parameter")  # fmt: skip
                texts.append(part["text"])
            content = "".join(texts)
        out.append({"role": role, "content": content})
    return out


def stop_list(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else list(stop)
