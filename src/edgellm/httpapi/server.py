"""Serving an ASGI app with uvicorn: bind, serve (foreground or on a thread), stop in order.

::

    server = HttpServer(app, host="127.0.0.1", port=0, limits=HttpLimits(...), drain=drain)
    server.bind()            # OSError if the address cannot be bound; port 0 picks one
    print(server.url)
    server.serve()           # foreground: until SIGTERM / SIGINT, then the shutdown below
    # or: server.start() ... server.stop()   (a thread of its own; both idempotent)

Shutdown, in uvicorn's order with one step added: stop accepting -> ``drain()`` (the app's
own: let requests in flight finish within its bound, then end the rest with an error it
can still send) -> close idle connections and wait up to ``limits.shutdown_grace`` for the
rest -> cancel what remains -> the app's lifespan shutdown.

The listening socket is bound here, not by uvicorn, so that a port in use is an ``OSError``
for the caller (uvicorn would ``sys.exit``) and port 0 is known before serving starts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import uvicorn

from edgellm.comm.urls import is_loopback
from edgellm.httpapi.protocol import guarded_protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """Per-server limits; validated on construction."""

    max_body: int = 8 << 20
    """Request body bytes (the guard middleware enforces it; 413 beyond)."""
    max_head: int = 16 << 10
    """Request line + headers bytes (400 beyond)."""
    max_connections: int = 1024
    """Open connections (a new one beyond gets 503 and is closed)."""
    request_timeout: float = 10.0
    """Seconds a request head, and each read of a body, may take (408 beyond)."""
    keep_alive: float = 5.0
    """Seconds an idle keep-alive connection stays open."""
    shutdown_grace: float = 5.0
    """Seconds connections get to finish after the app's drain (then they are cancelled)."""
    backlog: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_body", "max_head", "max_connections", "backlog"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("request_timeout", "keep_alive", "shutdown_grace"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")


def access_note(host: str, api_key: str | None) -> str:
    """Who may connect, for the start-up line of a server."""
    where = "loopback only" if is_loopback(host) else "OPEN TO THE NETWORK"
    return f"{where}; {'API key required' if api_key else 'no API key'}"


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]] | None):
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets=None) -> None:
        for server in getattr(self, "servers", []):
            server.close()  # stop accepting before the drain; uvicorn's second close is a no-op
        if self._drain is not None:
            try:
                await self._drain()
            except Exception:
                log.exception("drain failed")
        await super().shutdown(sockets)


class HttpServer:
    """One app on one listening socket (see the module docstring)."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0,
                 limits: HttpLimits | None = None,
                 drain: Callable[[], Awaitable[None]] | None = None,
                 name: str = "http"):  # fmt: skip
        self.app = app
        self.limits = limits or HttpLimits()
        self.name = name
        self._address = (host, port)
        self._sock: socket.socket | None = None
        self._drain = drain
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._state = "new"

    # -- address -----------------------------------------------------------------------

    def bind(self) -> "HttpServer":
        """Bind and listen; raises ``OSError``. Idempotent."""
        if self._sock is None:
            host, port = self._address
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            if family == socket.AF_INET and not host.replace(".", "").isdigit():
                family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say
            # they are TCP, and without it every answer written in two parts (head, body)
            # waits ~40 ms for the client's delayed ACK.
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind((host.strip("[]"), port))
                sock.listen(self.limits.backlog)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self._address = self._sock.getsockname()[:2]
        return self

    @property
    def host(self) -> str:
        return self._address[0]

    @property
    def port(self) -> int:
        """The port (once bound, the real one even when 0 was asked for)."""
        return self._address[1]

    @property
    def url(self) -> str:
        host = self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    # -- serving -------------------------------------------------------------------------

    def _uvicorn(self) -> _Server:
        limits = self.limits
        config = uvicorn.Config(
            self.app,
            http=guarded_protocol(max_connections=limits.max_connections,
                                  head_timeout=limits.request_timeout),
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_keep_alive=limits.keep_alive,
            timeout_graceful_shutdown=limits.shutdown_grace,
            h11_max_incomplete_event_size=limits.max_head,
            backlog=limits.backlog,
            server_header=False,
        )  # fmt: skip
        return _Server(config, self._drain)

    def serve(self) -> None:
        """Serve in the foreground until SIGTERM or SIGINT, then shut down in order.

        Raises ``RuntimeError`` if the app's startup failed."""
        self.bind()
        self._claim()
        server = self._server = self._uvicorn()
        # uvicorn re-raises the signal it caught once it has stopped, with the handler that
        # was there before it: make that one harmless so the process exits normally.
        previous = {sig: signal.signal(sig, lambda *_: None)
                    for sig in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
        try:
            asyncio.run(server.serve(sockets=[self._sock]))
        except SystemExit:
            raise RuntimeError(f"{self.name}: the app failed to start") from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close_socket()
            self._state = "stopped"

    def start(self, timeout: float = 30.0) -> "HttpServer":
        """Serve on a thread of its own; returns once serving. Raises ``RuntimeError`` if
        the app's startup failed or took over ``timeout`` seconds."""
        self.bind()
        self._claim()
        server = self._server = self._uvicorn()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[self._sock]))
            except BaseException as exc:  # SystemExit from a failed startup, among others
                failure.append(exc)

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:  # uvicorn offers no event to wait on
            if failure or not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name}: the app failed to start: {failure[:1]!r}")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down (see the module docstring) and wait; safe to call twice."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._close_socket()
        self._state = "stopped"

    def __enter__(self) -> "HttpServer":
        return self.start() if self._state == "new" else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _claim(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"{self.name} already {self._state}")
        self._state = "running"

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
