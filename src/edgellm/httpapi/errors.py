"""OpenAI's error shape, for every HTTP answer of the product that is not a success.

Every error is the HTTP status plus one JSON object::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages",
               "code": "context_length_exceeded"}}

``type`` follows the status (:data:`TYPES`); ``param`` names the request field at fault
(``None`` when no single field is); ``code`` is a short machine-readable string or ``None``.
After a stream has begun, the same object is sent as one SSE ``data:`` event (the gateway's
streaming code does that).

:func:`install_error_handlers` makes a FastAPI app answer this way for its own errors too:
unknown paths (404), methods a path does not take (405, with a deterministic ``Allow``),
:class:`APIError` raised anywhere in a handler, and anything unexpected (500, logged).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    501: "invalid_request_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def error_type(status: int) -> str:
    """The OpenAI error ``type`` for an HTTP status."""
    return TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, *, type: str | None = None, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:  # fmt: skip
    """The JSON object of an error answer."""
    return {"error": {"message": message, "type": type or error_type(status), "param": param,
                      "code": code}}  # fmt: skip


class APIError(Exception):
    """An error answer: raise it from a handler, or turn it into a body or response.

    ``headers`` go on the response (``Retry-After``, ``WWW-Authenticate``, ``Allow``...).
    """

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, type=self.type, param=self.param,
                          code=self.code)  # fmt: skip

    def response(self, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**self.headers, **(extra_headers or {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, code={self.code!r})"


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> str:
    """The ``Allow`` header for the path of ``scope``: its routes' methods in a fixed order."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": "GET", "type": "http"})
        route_methods = getattr(route, "methods", None)
        if match != Match.NONE and route_methods:
            methods |= set(route_methods)
    return ", ".join(sorted(methods, key=lambda m: (_METHOD_ORDER.index(m)
                                                    if m in _METHOD_ORDER else 99, m)))


def install_error_handlers(app: FastAPI) -> None:
    """Make ``app`` answer every error in OpenAI's shape (see the module docstring)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        headers = dict(exc.headers or {})
        if status == 404:
            message, code = f"no such path: {request.url.path}", "not_found"
        elif status == 405:
            headers["Allow"] = allowed_methods(app, request.scope)
            message = f"method {request.method} not allowed on {request.url.path}"
            code = "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return JSONResponse(error_body(status, message, code=code), status_code=status,
                            headers=headers)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(400, first.get("msg", "invalid request"), param=param),
                            status_code=400)  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"),
                            status_code=500)  # fmt: skip
