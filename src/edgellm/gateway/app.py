"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (streaming and not), vLLM's ``/tokenize`` and ``/detokenize``,
``/health`` (503 until a backend is ready), ``/metrics``.

Every request gets one ``X-Request-Id`` (the client's, if it sent a valid one: 1-128
visible ASCII characters, else 400), echoed on the answer (also as AIBrix's ``request-id``)
and sent to the engine. Generation answers carry ``target-pod`` (the backend) and
``routing-strategy``. Errors are OpenAI's shape (:mod:`edgellm.httpapi.errors`); after a
stream began, one error event then ``[DONE]`` (:mod:`edgellm.gateway.responses`). A client
that leaves stops its generation on the engine.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgellm.gateway import schemas
from edgellm.gateway.backend import BackendError, Delta, GenerationRequest
from edgellm.gateway.responses import DONE, ResponseBuilder, sse
from edgellm.gateway.routing import HEADER as STRATEGY_HEADER
from edgellm.gateway.service import Gateway, Running
from edgellm.httpapi import APIError, install_error_handlers
from edgellm.httpapi.errors import error_body
from edgellm.httpapi.guard import send_error
from edgellm.httpapi.schema import get_and_head, json_body

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RequestIds:
    """ASGI middleware: the request id of the module docstring, in ``scope["state"]``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        if given is None:
            request_id = uuid.uuid4().hex
        else:
            request_id = given.decode("latin-1")
            if not _REQUEST_ID.fullmatch(request_id):
                return await send_error(send, 400, "X-Request-Id must be 1-128 visible ASCII "
                                        "characters", code="invalid_request_id", close=False)
        scope.setdefault("state", {})["request_id"] = request_id
        raw = request_id.encode()

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", raw),
                                      (b"request-id", raw)]  # fmt: skip
            await send(message)

        await self.app(scope, receive, send_with_id)


def build_app(gateway: Gateway, registry, *, lifespan=None) -> FastAPI:
    app = FastAPI(title="edgellm gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    api = _Endpoints(gateway, registry)

    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"],
                      openapi_extra=json_body(app, schemas.ChatCompletionRequest))
    app.add_api_route("/v1/completions", api.completions, methods=["POST"],
                      openapi_extra=json_body(app, schemas.CompletionRequest))
    get_and_head(app, "/v1/models", api.list_models)
    app.add_api_route("/tokenize", api.tokenize, methods=["POST"],
                      openapi_extra=json_body(app, schemas.TokenizeRequest))
    app.add_api_route("/detokenize", api.detokenize, methods=["POST"],
                      openapi_extra=json_body(app, schemas.DetokenizeRequest))
    get_and_head(app, "/health", api.get_health)
    get_and_head(app, "/metrics", api.get_metrics)
    return app


class _Endpoints:
    def __init__(self, gateway: Gateway, registry):
        self.gateway = gateway
        self.registry = registry
        self.metrics = gateway.metrics

    # -- generation ------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str) -> Response:
        arrived = time.monotonic()
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        model = ""
        try:
            body = await request.body()
            parsed = schemas.parse(body, schemas.ChatCompletionRequest if kind == "chat"
                                   else schemas.CompletionRequest)  # fmt: skip
            schemas.refuse_unsupported(parsed)
            gen = _generation_request(parsed, kind, request.state.request_id)
            strategy = self.gateway.strategy(request.headers.get(STRATEGY_HEADER))
            await self.gateway.check_model(gen.model)
            model = gen.model
            ids = await self.gateway.prompt_ids(gen, strategy)
            self.gateway.check_lengths(gen, len(ids) if ids is not None else None)
            running = await self.gateway.start(gen, strategy, ids, arrived)
        except APIError as exc:
            self.metrics.requests.labels(endpoint, model, str(exc.status)).inc()
            raise
        except BackendError as exc:
            self.metrics.requests.labels(endpoint, model, str(exc.status)).inc()
            raise APIError(exc.status, exc.message, code=exc.code, param=exc.param) from None
        headers = {"target-pod": running.backend.key, "routing-strategy": strategy}
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        builder = ResponseBuilder(kind, gen.model, include_usage)
        if parsed.stream:
            return StreamingResponse(self._stream(running, builder, endpoint),
                                     media_type="text/event-stream",
                                     headers={**headers, **_SSE_HEADERS})  # fmt: skip
        try:
            text, finished = await _collect(running, request)
        except (APIError, BackendError) as exc:
            status = exc.status
            self.metrics.requests.labels(endpoint, model, str(status)).inc()
            if isinstance(exc, BackendError):
                exc = APIError(exc.status, exc.message, code=exc.code, param=exc.param)
            return exc.response(headers)
        finally:
            running.abort_soon()
        self._account(running, endpoint, "200")
        return JSONResponse(builder.complete(text, finished), headers=headers)

    async def _stream(self, running: Running, builder: ResponseBuilder,
                      endpoint: str) -> AsyncIterator[bytes]:  # fmt: skip
        status = "499"  # the client left, unless the stream ends otherwise
        try:
            opening = builder.opening()
            async for event in running.events():
                if isinstance(event, Delta):
                    yield opening + builder.delta(event.text)
                else:
                    yield opening + builder.closing(event)
                    status = "200"
                opening = b""
        except (APIError, BackendError) as exc:
            status = str(exc.status)
            error = error_body(exc.status, exc.message, code=exc.code, param=exc.param)
            yield sse(error) + DONE
        finally:
            running.abort_soon()
            self._account(running, endpoint, status)

    def _account(self, running: Running, endpoint: str, status: str) -> None:
        model = running.request.model
        self.metrics.requests.labels(endpoint, model, status).inc()
        first = running.first_token_at
        if first is not None:
            self.metrics.ttft.labels(model).observe(first - running.arrived)
        self.metrics.duration.labels(model).observe(time.monotonic() - running.arrived)
        finished = running.finished
        if finished is not None:
            self.metrics.prompt_tokens.labels(model).inc(finished.prompt_tokens)
            self.metrics.cached_tokens.labels(model).inc(finished.cached_tokens or 0)
            self.metrics.generation_tokens.labels(model).inc(finished.completion_tokens)

    # -- the rest ----------------------------------------------------------------------------

    async def list_models(self) -> JSONResponse:
        served: dict[str, Any] = {}
        for backend in self.gateway.pool.backends():
            if backend.healthy:
                for name in backend.models:
                    served.setdefault(name, {"id": name, "object": "model", "created": 0,
                                             "owned_by": "edgellm", "root": name, "parent": None,
                                             "max_model_len": self.gateway.max_context(name)})
        return JSONResponse({"object": "list", "data": [served[k] for k in sorted(served)]})

    async def get_health(self) -> JSONResponse:
        backends = {b.key: b.describe() for b in self.gateway.pool.backends()}
        if self.gateway.draining:
            body = error_body(503, "the server is shutting down", code="shutting_down")
        elif not any(b.healthy and b.models for b in self.gateway.pool.backends()):
            body = error_body(503, "no backend is ready", code="no_backend_available")
        else:
            return JSONResponse({"status": "ok", "backends": backends})
        return JSONResponse({**body, "backends": backends}, status_code=503)

    async def get_metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def tokenize(self, request: Request) -> JSONResponse:
        parsed = schemas.parse(await request.body(), schemas.TokenizeRequest)
        model = self._model_or_default(parsed.model)
        if (parsed.prompt is None) == (parsed.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        messages = schemas.chat_messages(parsed.messages) if parsed.messages is not None else None
        tokenizer = self.gateway.tokenizers.tokenizer(model)
        if tokenizer is not None:
            try:
                if messages is not None:
                    ids = tokenizer.encode_chat(
                        messages, add_generation_prompt=parsed.add_generation_prompt is not False)
                else:
                    ids = tokenizer.encode(
                        parsed.prompt, add_special_tokens=parsed.add_special_tokens is not False)
            except ValueError as exc:  # the template refused the messages
                raise APIError(400, str(exc), param="messages") from None
        else:
            if parsed.add_generation_prompt is False or parsed.add_special_tokens is False:
                raise APIError(400, f"no local tokenizer for {model!r}: only the engine's own "
                               "defaults can be asked for", code="no_local_tokenizer")
            gen = GenerationRequest("tokenize", model, "chat" if messages else "completion",
                                    messages=messages, prompt=parsed.prompt)  # fmt: skip
            ids = await self.gateway.tokenizers.remote_ids(gen)
            if ids is None:
                raise APIError(501, f"no local tokenizer for {model!r} and no engine serving it "
                               "could tokenize", code="no_tokenizer")  # fmt: skip
        return JSONResponse({"count": len(ids), "max_model_len": self.gateway.max_context(model),
                             "tokens": ids, "token_strs": None})  # fmt: skip

    async def detokenize(self, request: Request) -> JSONResponse:
        parsed = schemas.parse(await request.body(), schemas.DetokenizeRequest)
        model = self._model_or_default(parsed.model)
        tokenizer = self.gateway.tokenizers.tokenizer(model)
        if tokenizer is None:
            raise APIError(501, f"no local tokenizer for {model!r} (start the gateway with "
                           f"--tokenizer {model}=PATH)", code="no_local_tokenizer")
        if any(t < 0 for t in parsed.tokens):
            raise APIError(400, "'tokens' must be ids >= 0", param="tokens")
        try:
            text = tokenizer.decode(parsed.tokens)
        except (ValueError, IndexError, OverflowError, TypeError) as exc:
            raise APIError(400, f"'tokens': {exc}", param="tokens") from None
        return JSONResponse({"prompt": text})

    def _model_or_default(self, model: str | None) -> str:
        if model is None:
            known = self.gateway.pool.known_models() | set(self.gateway.tokenizers.local)
            if len(known) != 1:
                raise APIError(400, "'model' is required", param="model",
                               code="missing_required_parameter")  # fmt: skip
            return known.pop()
        known = self.gateway.pool.known_models()
        if model not in known and model not in self.gateway.tokenizers.local:
            raise APIError(404, f"The model `{model}` does not exist.", param="model",
                           code="model_not_found")  # fmt: skip
        return model


def _generation_request(parsed, kind: str, request_id: str) -> GenerationRequest:
    gen = GenerationRequest(
        request_id, parsed.model, kind,
        max_tokens=getattr(parsed, "max_completion_tokens", None) or parsed.max_tokens,
        temperature=parsed.temperature, top_p=parsed.top_p,
        top_k=parsed.top_k if parsed.top_k not in (None, -1) else None, seed=parsed.seed,
        stop=schemas.stop_list(parsed.stop), ignore_eos=parsed.ignore_eos,
        cache_salt=parsed.cache_salt, body=parsed.model_dump(exclude_unset=True),
    )  # fmt: skip
    if kind == "chat":
        gen.messages = schemas.chat_messages(parsed.messages)
        return gen
    prompt = parsed.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError(400, "'prompt': one prompt per request (batches are not supported)",
                           param="prompt", code="unsupported_parameter")  # fmt: skip
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt:
            raise APIError(400, "'prompt': no token ids", param="prompt", code="invalid_value")
        if any(t < 0 or t >= 1 << 32 for t in prompt):
            raise APIError(400, "'prompt': token ids must be in 0..2**32-1", param="prompt",
                           code="invalid_value")  # fmt: skip
        gen.prompt_token_ids = list(prompt)
    else:
        gen.prompt = prompt
    return gen


async def _collect(running: Running, request: Request) -> tuple[str, Any]:
    """The whole text and its :class:`Finished`; stops early if the client leaves."""
    parts: list[str] = []

    async def consume():
        async for event in running.events():
            if isinstance(event, Delta):
                parts.append(event.text)
        return running.finished

    async def client_gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
    if consumer not in done:
        raise APIError(499, "the client closed the connection", code="client_closed")
    return "".join(parts), consumer.result()
