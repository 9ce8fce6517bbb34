"""The HTTP/1.1 connection protocol: uvicorn's h11 one, with the limits a server needs
before an app can see a request.

- **connection count**: beyond ``max_connections`` open connections, a new one is answered
  ``503`` (OpenAI's error shape) and closed at once; uvicorn's own ``limit_concurrency``
  would answer in plain text, and only once a whole request has arrived;
- **request-head deadline**: a connection must deliver a complete request line and headers
  within ``head_timeout`` seconds of opening (or of its previous answer); one that sent part
  of a head and stalled gets ``408`` and is closed; an idle one is closed (uvicorn's
  keep-alive timeout usually closes it first);
- **unparsable request** (bad request line, headers over ``h11_max_incomplete_event_size``):
  ``400`` in OpenAI's shape instead of uvicorn's plain text.

:func:`guarded_protocol` makes the class for one server's limits (uvicorn instantiates the
class it is given, with no room for extra arguments).
"""

from __future__ import annotations

import asyncio

import h11
import msgspec
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgellm.httpapi.errors import error_body

_encode = msgspec.json.Encoder().encode


def _raw_answer(status: int, reason: bytes, message: str, code: str | None) -> bytes:
    """A complete HTTP/1.1 answer with ``Connection: close``, for a connection that has no
    h11 state to speak through."""
    body = _encode(error_body(status, message, code=code))
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body))) + body


class GuardedH11Protocol(H11Protocol):
    """See the module docstring; configure through :func:`guarded_protocol`."""

    max_connections: int | None = None
    head_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            self.transport = transport  # connection_lost closes it
            self._refused = True
            transport.write(_raw_answer(503, b"Service Unavailable",
                                        f"over {self.max_connections} open connections",
                                        "too_many_connections"))  # fmt: skip
            transport.close()
            return
        self._refused = False
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if getattr(self, "_refused", False):
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._head_bytes = True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()  # a whole head arrived: the app's deadlines apply now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        self._cancel_head_timer()
        self.transport.write(_raw_answer(400, b"Bad Request", "the request line or headers "
                                         "are malformed or too large", "bad_request"))  # fmt: skip
        self.transport.close()

    # -- the head deadline -------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_bytes = False
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes and self.conn.our_state is h11.IDLE:
            self.transport.write(_raw_answer(408, b"Request Timeout", "the request head did "
                                             "not arrive in time", "request_timeout"))  # fmt: skip
        self.transport.close()


def guarded_protocol(*, max_connections: int | None, head_timeout: float) -> type[H11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with these limits."""
    if head_timeout <= 0:
        raise ValueError("head_timeout must be > 0")
    if max_connections is not None and max_connections < 1:
        raise ValueError("max_connections must be >= 1")
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"max_connections": max_connections, "head_timeout": head_timeout})
