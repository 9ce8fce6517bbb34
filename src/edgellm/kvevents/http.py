"""HTTP front of the KV event manager: scoring for other gateways, metrics, health.

Endpoints (JSON in and out; every request gets exactly one answer; the stack, limits and
error shape are :mod:`edgellm.httpapi`'s, the same as ``edgellm serve``):

- ``POST /v1/score`` ``{"model": str, "lora_id"?: int (default -1), "token_ids": [int...],
  "pods"?: [pod_key...]}`` -> ``200 {"pods": {pod_key: {"matched_blocks": n, "percent":
  p}}}``: per pod, the consecutive full blocks of the prompt it holds from the start (pods
  without a match are omitted; ``pods`` restricts the candidates); for a pod of several
  data-parallel ranks, its best rank's. Bad input (here, or refused by the index:
  ``IndexInputError``) -> ``400``; any other index failure -> ``503``.
- ``GET /metrics``: the registry in Prometheus text format.
- ``GET /health`` (and ``/healthz``, its old name): ``200 {"status": "ok", "index_ready":
  true, "pods": [...]}`` while the manager runs and the index is ready, else ``503`` with
  ``"status": "unavailable"``.
- ``HEAD`` of the ``GET`` paths answers as ``GET`` without the body; other paths ``404``;
  a method a path does not take ``405`` with an ``Allow`` header.
- Limits (:class:`~edgellm.httpapi.server.HttpLimits`): a body without ``Content-Length``
  ``411``, over ``max_body`` bytes ``413``; a client slower than ``request_timeout`` (10 s)
  with its head or any read of its body ``408`` (the connection is closed); an unparsable
  request line or headers ``400``. With ``api_key``, every path but health needs
  ``Authorization: Bearer <key>`` (``401``).

Every error answer is OpenAI's ``{"error": {"message", "type", "param", "code"}}``; any
input, however malformed or deeply nested, gets one.

:class:`ScoreServer` serves on its own thread; ``start()`` binds (port 0 picks a free one,
see :attr:`ScoreServer.port`), ``stop()`` is idempotent.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from edgellm.httpapi import APIError, HttpLimits, HttpServer, RequestGuard, install_error_handlers
from edgellm.httpapi.schema import get_and_head, json_body
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvindex.api import NO_LORA, IndexInputError, PrefixIndex

log = logging.getLogger(__name__)

MAX_BODY = 8 << 20
REQUEST_TIMEOUT = 10.0
_U32 = 1 << 32
_decode_json = msgspec.json.Decoder().decode


class BadRequest(ValueError):
    """A request the server answers with 400."""


class ScoreRequest(BaseModel):
    """The body of ``POST /v1/score`` (for the OpenAPI schema; parsing is
    :func:`parse_score_request`'s)."""

    model_config = ConfigDict(extra="allow")
    model: str
    lora_id: int | None = NO_LORA
    token_ids: list[int]
    pods: list[str] | None = None


def parse_score_request(body: bytes) -> tuple[str, int, list[int], list[str] | None]:
    """``(model, lora_id, token_ids, pods)`` from a /v1/score body (UTF-8 JSON); raises
    :class:`BadRequest` for anything else."""
    try:
        # RFC 8259: UTF-8, no lone surrogate ("\ud800" names no character), no NaN
        req = _decode_json(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("body is not JSON: nested too deeply") from None
    if not isinstance(req, dict):
        raise BadRequest("body must be a JSON object")
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string")
    lora = req.get("lora_id", NO_LORA)
    if lora is None:
        lora = NO_LORA
    if isinstance(lora, bool) or not isinstance(lora, int) or not -(1 << 63) <= lora < 1 << 63:
        raise BadRequest("'lora_id' must be a 64-bit integer")
    tokens = req.get("token_ids")
    if not isinstance(tokens, list):
        raise BadRequest("'token_ids' must be a list of integers")
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < _U32:
            raise BadRequest("'token_ids' must hold integers in 0..2**32-1")
    pods = req.get("pods")
    if pods is not None and (not isinstance(pods, list) or not all(isinstance(p, str) for p in pods)):
        raise BadRequest("'pods' must be a list of pod keys")
    return model, lora, tokens, pods


def score(manager: KVEventManager, index: PrefixIndex, body: bytes) -> dict[str, Any]:
    """The answer of ``POST /v1/score``; raises :class:`APIError` (400, 503)."""
    try:
        model, lora, tokens, pods = parse_score_request(body)
    except BadRequest as exc:
        raise APIError(400, str(exc)) from None
    except Exception as exc:  # input no check foresaw is still bad input
        log.warning("unexpected error parsing a score request: %r", exc)
        raise APIError(400, f"bad request: {type(exc).__name__}") from None
    keys = None if pods is None else manager.index_keys(pods)
    try:
        matches = index.match_prefix((model, lora), tokens, keys)
    except IndexInputError as exc:  # what the index refuses is the request's fault
        raise APIError(400, str(exc)) from None
    except Exception as exc:
        log.exception("match_prefix failed")
        raise APIError(503, f"index unavailable: {exc!r:.200}", code="index_unavailable") from None
    best: dict[str, Any] = {}  # a pod of several data-parallel ranks: its best rank
    for key, match in matches.items():
        pod = manager.pod_of(key)
        if pod not in best or match.matched_blocks > best[pod].matched_blocks:
            best[pod] = match
    return {"pods": {pod: {"matched_blocks": m.matched_blocks, "percent": m.percent}
                     for pod, m in best.items()}}  # fmt: skip


def health(manager: KVEventManager, index: PrefixIndex) -> tuple[int, dict[str, Any]]:
    try:
        ready = bool(index.is_ready())
    except Exception:
        ready = False
    ok = ready and manager.running
    body = {"status": "ok" if ok else "unavailable", "index_ready": ready,
            "pods": manager.subscribed_pods()}  # fmt: skip
    return (200 if ok else 503), body


def build_app(manager: KVEventManager, index: PrefixIndex, registry: CollectorRegistry) -> FastAPI:
    """The FastAPI app of the endpoints above (limits and the API key are the server's)."""
    app = FastAPI(title="edgellm kv-events", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.post("/v1/score", openapi_extra=json_body(app, ScoreRequest))
    async def post_score(request: Request) -> JSONResponse:
        body = await request.body()
        # The index may be Redis: a blocking call, so off the event loop.
        return JSONResponse(await run_in_threadpool(score, manager, index, body))

    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def get_health() -> JSONResponse:
        status, body = health(manager, index)
        return JSONResponse(body, status_code=status)

    get_and_head(app, "/metrics", metrics)
    get_and_head(app, "/health", get_health)
    get_and_head(app, "/healthz", get_health, include_in_schema=False)

    return app


class ScoreServer:
    """The HTTP endpoints above, serving ``index`` / ``manager`` / ``registry``."""

    def __init__(self, manager: KVEventManager, index: PrefixIndex, registry: CollectorRegistry,
                 *, host: str = "127.0.0.1", port: int = 0, max_body: int = MAX_BODY,
                 request_timeout: float = REQUEST_TIMEOUT, api_key: str | None = None,
                 limits: HttpLimits | None = None):  # fmt: skip
        self.manager = manager
        self.index = index
        self.registry = registry
        base = limits or HttpLimits()
        self.limits = HttpLimits(**{**base.__dict__, "max_body": max_body,
                                    "request_timeout": request_timeout})  # fmt: skip
        app = RequestGuard(build_app(manager, index, registry), api_key=api_key,
                           max_body=max_body, body_timeout=request_timeout,
                           max_head=self.limits.max_head)  # fmt: skip
        self._http = HttpServer(app, host=host, port=port, limits=self.limits, name="kv-http")
        self._http.bind()

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def host(self) -> str:
        return self._http.host

    def score(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """What ``POST /v1/score`` answers to ``body``, in process: (status, JSON object)."""
        try:
            return 200, score(self.manager, self.index, body)
        except APIError as exc:
            return exc.status, exc.body()

    def start(self) -> "ScoreServer":
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> "ScoreServer":
        self._http.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
