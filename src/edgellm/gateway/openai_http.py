"""Backends that speak the OpenAI API over HTTP themselves: vLLM, or another ``edgellm serve``.

Requests are proxied with streaming (the engine always streams to the gateway, with
``stream_options.include_usage``, whatever the client asked; the gateway re-renders the
answer), carrying the client's ``X-Request-Id``. The engine's models come from its
``GET /v1/models`` (``max_model_len``), its health from ``GET /health``, its load from
vLLM's gauges on ``GET /metrics`` (summed over the engine's series per ``model_name``;
``vllm:gpu_cache_usage_perc`` of older vLLM read as ``kv_cache_usage_perc``). Where it
publishes KV events is not in its API: the :class:`~edgellm.gateway.specs.EngineSpec` says.

An answer of 4xx (but 429) is the request's fault and is passed on; 429, 5xx and transport
failures before the first piece make the gateway try another backend. Aborting a generation
closes its HTTP stream (vLLM aborts a request whose client left).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edgellm.gateway.backend import (
    Backend,
    BackendError,
    BackendUnavailable,
    Delta,
    EngineLoad,
    Finished,
    Generation,
    GenerationRequest,
    ModelInfo,
    RequestRefused,
)
from edgellm.gateway.specs import EngineSpec

log = logging.getLogger(__name__)

_GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
           "vllm:kv_cache_usage_perc": "usage", "vllm:gpu_cache_usage_perc": "usage"}  # fmt: skip
MAX_ERROR_BODY = 64 << 10


class HttpEngine(Backend):
    kind = "openai"

    def __init__(self, spec: EngineSpec, client: httpx.AsyncClient, *, check_timeout: float = 5.0):
        super().__init__()
        self.spec = spec
        self.key = spec.key
        self.client = client
        self.check_timeout = check_timeout
        self._headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}

    async def refresh(self) -> None:
        try:
            health = await self._get("/health")
            if health.status_code != 200:
                self.healthy, self.problem = False, f"/health answered {health.status_code}"
                return
            models = await self._get("/v1/models")
            self.models = self._model_infos(models.json())
            metrics = await self._get("/metrics")
            if metrics.status_code == 200:
                self.loads = _loads(metrics.text, self.models)
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.healthy, self.problem = False, f"{type(exc).__name__}: {exc}"[:300]
            return
        self.healthy, self.problem = True, ""

    async def _get(self, path: str) -> httpx.Response:
        return await self.client.get(self.spec.url + path, headers=self._headers,
                                     timeout=self.check_timeout)  # fmt: skip

    def _model_infos(self, listing: dict[str, Any]) -> dict[str, ModelInfo]:
        infos = {}
        for entry in listing["data"]:
            name = entry["id"]
            if self.spec.models and name not in self.spec.models:
                continue
            context = entry.get("max_model_len")
            infos[name] = ModelInfo(name, context if isinstance(context, int) and context > 0
                                    else None, self.spec.block_size, self.spec.kv_pod(name))
        return infos

    async def generate(self, request: GenerationRequest) -> Generation:
        path = "/v1/chat/completions" if request.kind == "chat" else "/v1/completions"
        body = dict(request.body)
        body.update(model=request.model, stream=True, stream_options={"include_usage": True})
        if request.max_tokens is not None:
            body.pop("max_completion_tokens", None)
            body["max_tokens"] = request.max_tokens
        if request.kind == "completion" and request.prompt_token_ids is not None:
            body["prompt"] = request.prompt_token_ids
        headers = {**self._headers, "X-Request-Id": request.request_id}
        try:
            response = await self.client.send(self.client.build_request(
                "POST", self.spec.url + path, json=body, headers=headers), stream=True)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"{self.key}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            try:
                raw = await response.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await response.aclose()
            raise _refusal(self.key, response.status_code, raw[:MAX_ERROR_BODY])
        return HttpGeneration(self, response)

    async def tokenize(self, model: str, *, messages=None, prompt=None) -> list[int]:
        body: dict[str, Any] = {"model": model}
        body.update({"messages": messages} if messages is not None else {"prompt": prompt})
        try:
            response = await self.client.post(self.spec.url + "/tokenize", json=body,
                                              headers=self._headers, timeout=self.check_timeout)
            if response.status_code in (404, 405, 501):  # an engine without the endpoint
                raise NotImplementedError
            if response.status_code != 200:
                raise _refusal(self.key, response.status_code, response.content[:MAX_ERROR_BODY])
            tokens = response.json()["tokens"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise BackendUnavailable(f"{self.key}: tokenize: {exc!r}") from None
        if not isinstance(tokens, list):
            raise BackendUnavailable(f"{self.key}: tokenize answered no token list")
        return tokens


class HttpGeneration(Generation):
    def __init__(self, engine: HttpEngine, response: httpx.Response):
        self.engine = engine
        self.response = response
        self._lines = response.aiter_lines()
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._pieces = 0
        self.done = False

    async def __anext__(self) -> Delta | Finished:
        while not self.done:
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:
                return await self._end_of_stream()
            except httpx.HTTPError as exc:
                await self._close()
                error = BackendUnavailable if not self._pieces else BackendError
                raise error(f"{self.engine.key}: stream broken: {type(exc).__name__}") from None
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return await self._end_of_stream()
            try:
                chunk = json.loads(data)
            except ValueError:
                await self._close()
                raise BackendError(f"{self.engine.key} sent an unreadable chunk") from None
            if "error" in chunk:
                await self._close()
                raise _stream_error(self.engine.key, chunk["error"])
            if chunk.get("usage"):
                self._usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                if choice.get("finish_reason"):
                    self._finish_reason = choice["finish_reason"]
                if "delta" in choice:  # chat
                    text = (choice.get("delta") or {}).get("content")
                else:  # completion
                    text = choice.get("text")
                if text:
                    self._pieces += 1
                    return Delta(text)
        raise StopAsyncIteration

    async def _end_of_stream(self) -> Finished:
        await self._close()
        if self._finish_reason is None:
            error = BackendUnavailable if not self._pieces else BackendError
            raise error(f"{self.engine.key} ended the stream without a finish_reason")
        usage = self._usage or {}
        details = usage.get("prompt_tokens_details") or {}
        return Finished(self._finish_reason, int(usage.get("prompt_tokens") or 0),
                        int(usage.get("completion_tokens") or 0),
                        details.get("cached_tokens"))  # fmt: skip

    async def _close(self) -> None:
        self.done = True
        await self.response.aclose()

    async def abort(self) -> None:
        if not self.done:
            await self._close()


def _refusal(key: str, status: int, raw: bytes) -> BackendError:
    try:
        error = json.loads(raw)["error"]
        message, code = str(error.get("message"))[:1000], error.get("code")
        param = error.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code, param = raw.decode("utf-8", "replace")[:300] or f"HTTP {status}", None, None
    if status == 429 or status >= 500:
        return BackendUnavailable(f"{key}: {message}", status=503 if status >= 500 else 429,
                                  code=str(code) if code else "backend_unavailable")  # fmt: skip
    return RequestRefused(message, status=status, code=str(code) if code else "invalid_value",
                          param=param if isinstance(param, str) else None)  # fmt: skip


def _stream_error(key: str, error: Any) -> BackendError:
    error = error if isinstance(error, dict) else {"message": str(error)}
    code = error.get("code")
    return BackendError(f"{key}: {error.get('message')}", status=502,
                        code=str(code) if code else "backend_error")  # fmt: skip


def _loads(text: str, models: dict[str, ModelInfo]) -> dict[str, EngineLoad]:
    sums: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = _GAUGES.get(sample.name)
            if field is None:
                continue
            names = [sample.labels["model_name"]] if "model_name" in sample.labels else list(models)
            for name in names:
                values = sums.setdefault(name, {"running": 0.0, "waiting": 0.0, "usage": 0.0})
                if field == "usage":
                    values["usage"] = max(values["usage"], sample.value)
                else:
                    values[field] += sample.value
    return {name: EngineLoad(int(v["running"]), int(v["waiting"]), min(1.0, max(0.0, v["usage"])))
            for name, v in sums.items() if name in models}  # fmt: skip
