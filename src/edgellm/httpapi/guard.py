"""What every request must pass before a handler sees it (pure ASGI middleware).

In order, each refusal answered in OpenAI's error shape (:mod:`edgellm.httpapi.errors`):

0. **Head size**: over ``max_head`` bytes of target and headers, or ``max_headers`` header
   lines -> ``431``. (The protocol's own bound, ``h11_max_incomplete_event_size``, only
   limits what is buffered while a head is incomplete; a big head in one read passes it.)
1. **API key**: with ``api_key`` set, every path but ``open_paths`` needs
   ``Authorization: Bearer <key>`` (compared in constant time) -> else ``401`` with
   ``WWW-Authenticate: Bearer``. vLLM's ``--api-key`` guards only ``/v1``; here
   ``/tokenize``, ``/detokenize`` and ``/metrics`` are guarded too, health stays open for
   probes.
2. **Body size**: a ``POST``/``PUT``/``PATCH`` needs a ``Content-Length`` (or a chunked
   body) -> else ``411``; over ``max_body`` bytes -> ``413`` at once (from the header, or
   as soon as a chunked body crosses it).
3. **Body deadline**: the body is read here, whole, each read waiting at most
   ``body_timeout`` seconds -> else ``408``: a client that promises bytes and stalls never
   holds a handler.

A refused request gets ``Connection: close``, so no unread body is left on the connection.
The body read here is handed on in one piece; after it, ``receive`` is the server's own,
so handlers still see ``http.disconnect`` when the client leaves.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any, Awaitable, Callable, Iterable

import msgspec

from edgellm.httpapi.errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_encode = msgspec.json.Encoder().encode


async def send_error(send: Send, status: int, message: str, *, code: str | None = None,
                     headers: Iterable[tuple[bytes, bytes]] = (),
                     close: bool = True) -> None:  # fmt: skip
    """Answer with an OpenAI error (raw ASGI: no app needed)."""
    body = _encode(error_body(status, message, code=code))
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head + list(headers)})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """The checks of the module docstring around ``app``."""

    def __init__(self, app: Callable, *, api_key: str | None = None, max_body: int = 8 << 20,
                 body_timeout: float = 10.0, max_head: int = 16 << 10, max_headers: int = 100,
                 open_paths: Iterable[str] = ("/health", "/healthz")):  # fmt: skip
        if max_body < 0 or body_timeout <= 0:
            raise ValueError("max_body must be >= 0 and body_timeout > 0")
        self.app = app
        self._key = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.max_head = max_head
        self.max_headers = max_headers
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        head += sum(len(k) + len(v) + 4 for k, v in headers)
        if head > self.max_head or len(headers) > self.max_headers:
            return await send_error(send, 431, f"request head over {self.max_head} bytes or "
                                    f"{self.max_headers} header lines", code="head_too_large")
        if self._key is not None and scope["path"] not in self.open_paths:
            given = _header(headers, b"authorization") or b""
            if not hmac.compare_digest(given, self._key):
                return await send_error(send, 401, "missing or incorrect API key (send "
                                        "'Authorization: Bearer <key>')", code="invalid_api_key",
                                        headers=[(b"www-authenticate", b"Bearer")], close=False)
        if scope["method"] not in _WITH_BODY:
            return await self.app(scope, receive, send)
        length = _header(headers, b"content-length")
        chunked = b"chunked" in (_header(headers, b"transfer-encoding") or b"").lower()
        if length is None and not chunked:
            return await send_error(send, 411, "Content-Length required", code="length_required")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await send_error(send, 400, "Content-Length is not a number")
            if declared > self.max_body:
                return await send_error(send, 413, f"body over {self.max_body} bytes",
                                        code="body_too_large")  # fmt: skip
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                return await send_error(send, 408, "the body did not arrive in time",
                                        code="request_timeout")  # fmt: skip
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await send_error(send, 413, f"body over {self.max_body} bytes",
                                        code="body_too_large")  # fmt: skip
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None
