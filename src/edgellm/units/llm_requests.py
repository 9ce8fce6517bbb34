"""What the llm unit accepts from StackFlow clients: setup settings and inference data.

Pure parsing (no engine, no sockets): each function returns plain values or raises
:class:`~edgellm.unit.UnitError` with the code the client gets (docs/llm-unit.md):

- ``-5`` (model loading failed): a model this unit does not serve;
- ``-22`` (config error): a value of the wrong type or out of range;
- ``-2`` (json format error): inference data that is not one of the accepted shapes;
- ``-24`` (empty inference data): nothing to generate from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from edgellm.engine.sampling import SamplingError, SamplingParams
from edgellm.protocol.errors import ErrorCode
from edgellm.unit import UnitError

DEFAULT_MAX_TOKEN_LEN = 1024
_OVERRIDES = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
_PROMPTS = ("messages", "prompt", "prompt_token_ids")
_STRUCTURED_KEYS = frozenset((*_PROMPTS, *_OVERRIDES, "cache_salt", "request_id", "model"))


def _config_error(detail: str) -> UnitError:
    return UnitError(ErrorCode.CONFIG, detail)


@dataclass(frozen=True)
class TaskSettings:
    """A task's model and defaults, from its ``setup`` data."""

    model: str
    max_token_len: int
    system_prompt: str
    sampling: SamplingParams

    def info(self) -> dict[str, Any]:
        s = self.sampling
        return {"max_token_len": self.max_token_len, "prompt": self.system_prompt,
                "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                "seed": s.seed, "stop": list(s.stop)}  # fmt: skip


def parse_setup(data: Mapping[str, Any], context_of: Mapping[str, int],
                failures: Mapping[str, str]) -> TaskSettings:  # fmt: skip
    """Settings from setup ``data``; ``context_of`` maps each served model to its context
    length, ``failures`` each model that failed to load to why."""
    model = data.get("model")
    if model in failures:
        raise UnitError(ErrorCode.MODEL_LOADING, f"model {model!r} failed to load: {failures[model]}")
    if model not in context_of:
        served = ", ".join(sorted(context_of)) or "none"
        raise UnitError(ErrorCode.MODEL_LOADING, f"unknown model {model!r}; this unit serves: {served}")
    context = context_of[model]
    max_len = data.get("max_token_len", min(DEFAULT_MAX_TOKEN_LEN, context - 1))
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len < context:
        raise _config_error(f"max_token_len must be an integer in 1..{context - 1}, got {max_len!r}")
    prompt = data.get("prompt", "")
    if not isinstance(prompt, str):
        raise _config_error("prompt (the system text) must be a string")
    sampling = _sampling(SamplingParams(max_tokens=max_len, temperature=0.0), data)
    return TaskSettings(model, max_len, prompt, sampling)


def _sampling(base: SamplingParams, values: Mapping[str, Any]) -> SamplingParams:
    changes = {k: values[k] for k in _OVERRIDES if k in values and values[k] is not None}
    if "stop" in changes and isinstance(changes["stop"], list):
        changes["stop"] = tuple(changes["stop"])
    try:
        return replace(base, **changes)
    except SamplingError as exc:
        raise _config_error(str(exc)) from None
    except TypeError as exc:  # e.g. stop given as a number
        raise _config_error(str(exc)) from None


@dataclass(frozen=True)
class StructuredRequest:
    """An inference request sent as an object (the gateway's form): exactly one prompt."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    cache_salt: str | None = None


def is_structured(data: Any) -> bool:
    """Whether inference ``data`` is the structured form (an object without ``delta``)."""
    return isinstance(data, dict) and "delta" not in data and any(k in data for k in _PROMPTS)


def parse_structured(data: Mapping[str, Any]) -> StructuredRequest:
    given = [k for k in _PROMPTS if data.get(k) is not None]
    if len(given) != 1:
        raise UnitError(ErrorCode.JSON_FORMAT,
                        f"structured inference needs exactly one of {', '.join(_PROMPTS)}")  # fmt: skip
    unknown = sorted(set(data) - _STRUCTURED_KEYS)
    if unknown:
        raise UnitError(ErrorCode.JSON_FORMAT, f"unknown field(s) {', '.join(unknown)}")
    salt = data.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise _config_error("cache_salt must be a non-empty string")
    overrides = {k: data[k] for k in _OVERRIDES if k in data and data[k] is not None}
    kind = given[0]
    value = data[kind]
    if kind == "messages":
        if not isinstance(value, list) or not value:
            raise UnitError(ErrorCode.EMPTY_INFERENCE, "messages is empty")
        return StructuredRequest(messages=value, overrides=overrides, cache_salt=salt)
    if kind == "prompt":
        if not isinstance(value, str):
            raise UnitError(ErrorCode.JSON_FORMAT, "prompt must be a string")
        if not value:
            raise UnitError(ErrorCode.EMPTY_INFERENCE, "prompt is empty")
        return StructuredRequest(prompt=value, overrides=overrides, cache_salt=salt)
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise UnitError(ErrorCode.JSON_FORMAT, "prompt_token_ids must be a list of integers")
    if not value:
        raise UnitError(ErrorCode.EMPTY_INFERENCE, "prompt_token_ids is empty")
    return StructuredRequest(prompt_token_ids=value, overrides=overrides, cache_salt=salt)


def request_sampling(settings: TaskSettings, overrides: Mapping[str, Any]) -> SamplingParams:
    """The task's sampling settings with a request's overrides; ``max_tokens`` may not
    exceed the task's ``max_token_len``."""
    params = _sampling(settings.sampling, overrides)
    if params.max_tokens > settings.max_token_len:
        raise _config_error(f"max_tokens {params.max_tokens} is over this task's max_token_len "
                            f"{settings.max_token_len}")  # fmt: skip
    return params
