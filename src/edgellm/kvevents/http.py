"""HTTP front of the KV event manager: scoring for other gateways, metrics, health.

Endpoints (JSON in and out; every request gets exactly one answer):

- ``POST /v1/score`` ``{"model": str, "lora_id"?: int (default -1), "token_ids": [int...],
  "pods"?: [pod_key...]}`` -> ``200 {"pods": {pod_key: {"matched_blocks": n, "percent":
  p}}}``: per pod, the consecutive full blocks of the prompt it holds from the start (pods
  without a match are omitted; ``pods`` restricts the candidates); for a pod of several
  data-parallel ranks, its best rank's. Bad input (here, or refused by the index:
  ``IndexInputError``) -> ``400 {"error": "..."}``; a body over ``max_body`` bytes ->
  ``413``; any other index failure -> ``503``.
- ``GET /metrics``: the registry in Prometheus text format.
- ``GET /healthz``: ``200 {"status": "ok", "index_ready": true, "pods": [...]}`` while
  the manager runs and the index is ready, else ``503`` with ``"status": "unavailable"``.
- ``HEAD`` of ``/metrics`` and ``/healthz`` answers as ``GET`` without the body.
- other paths ``404``; a method a path does not take (``OPTIONS`` included) ``405`` with
  an ``Allow`` header; a request line or headers the server cannot parse ``400``.
- a client slower than ``request_timeout`` (10 s) between two reads (a body shorter than
  its ``Content-Length``, an idle keep-alive connection) gets ``408`` and is closed, so
  stalled clients never hold the server's threads.

Every error answer is a JSON ``{"error": "..."}``; any input, however malformed or deeply
nested, gets one.

:class:`ScoreServer` runs a ``ThreadingHTTPServer`` on its own thread; ``start()`` binds
(port 0 picks a free one, see :attr:`ScoreServer.port`), ``stop()`` is idempotent.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from edgellm.kvevents.manager import KVEventManager
from edgellm.kvindex.api import NO_LORA, IndexInputError, PrefixIndex

log = logging.getLogger(__name__)

MAX_BODY = 8 << 20
REQUEST_TIMEOUT = 10.0
_U32 = 1 << 32
_ALLOW = {"/v1/score": "POST", "/metrics": "GET, HEAD", "/healthz": "GET, HEAD"}


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # listen backlog: a burst of clients is not refused (5 by default)

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # the client went away
            log.debug("HTTP client %s: %r", client_address, exc)
        else:
            log.exception("HTTP request from %s failed", client_address)


class BadRequest(ValueError):
    """A request the server answers with 400."""


def parse_score_request(body: bytes) -> tuple[str, int, list[int], list[str] | None]:
    """``(model, lora_id, token_ids, pods)`` from a /v1/score body (UTF-8 JSON); raises
    :class:`BadRequest` for anything else."""
    try:
        req = json.loads(body.decode("utf-8"))  # JSON between systems is UTF-8 (RFC 8259)
    except (ValueError, UnicodeDecodeError) as exc:
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


class ScoreServer:
    """The HTTP endpoints above, serving ``index`` / ``manager`` / ``registry``."""

    def __init__(self, manager: KVEventManager, index: PrefixIndex, registry: CollectorRegistry,
                 *, host: str = "127.0.0.1", port: int = 0, max_body: int = MAX_BODY,
                 request_timeout: float = REQUEST_TIMEOUT):  # fmt: skip
        self.manager = manager
        self.index = index
        self.registry = registry
        self.max_body = max_body
        self.request_timeout = request_timeout
        self._httpd = _Server((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kv-http",
                                        daemon=True)  # fmt: skip
        self._state = "new"

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    def start(self) -> "ScoreServer":
        if self._state != "new":
            raise RuntimeError(f"server already {self._state}")
        self._state = "running"
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._state == "running":
            self._httpd.shutdown()
        if self._state != "stopped":
            self._httpd.server_close()
        self._state = "stopped"

    def __enter__(self) -> "ScoreServer":
        if self._state == "new":
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- request handling (on the server's threads) ------------------------------------

    def score(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            model, lora, tokens, pods = parse_score_request(body)
        except BadRequest as exc:
            return 400, {"error": str(exc)}
        except Exception as exc:  # input no check foresaw is still bad input
            log.warning("unexpected error parsing a score request: %r", exc)
            return 400, {"error": f"bad request: {type(exc).__name__}"}
        keys = None if pods is None else self.manager.index_keys(pods)
        try:
            matches = self.index.match_prefix((model, lora), tokens, keys)
        except IndexInputError as exc:  # what the index refuses is the request's fault
            return 400, {"error": str(exc)}
        except Exception as exc:
            log.exception("match_prefix failed")
            return 503, {"error": f"index unavailable: {exc!r:.200}"}
        best: dict[str, Any] = {}  # a pod of several data-parallel ranks: its best rank
        for key, match in matches.items():
            pod = self.manager.pod_of(key)
            if pod not in best or match.matched_blocks > best[pod].matched_blocks:
                best[pod] = match
        return 200, {"pods": {pod: {"matched_blocks": m.matched_blocks, "percent": m.percent}
                              for pod, m in best.items()}}  # fmt: skip

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            ready = bool(self.index.is_ready())
        except Exception:
            ready = False
        ok = ready and self.manager.running
        body = {"status": "ok" if ok else "unavailable", "index_ready": ready,
                "pods": self.manager.subscribed_pods()}  # fmt: skip
        return (200 if ok else 503), body

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "edgellm-kv-events"
            timeout = server.request_timeout  # the socket's: each read and write

            def log_message(self, fmt, *args):
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, code: int, body: bytes, ctype: str, headers=()) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, code: int, obj: dict[str, Any], headers=()) -> None:
                self._send(code, json.dumps(obj).encode(), "application/json", headers)

            def send_error(self, code, message=None, explain=None):
                # The base class answers in HTML (unparsable request line, headers, an
                # unknown method): answer in JSON like everything else.
                self.close_connection = True
                if code == 501:  # no do_<METHOD>: a method this server never takes
                    return self._not_allowed()
                self._json(code, {"error": message or self.responses.get(code, ("",))[0]})

            def _path(self) -> str:
                return self.path.split("?", 1)[0]

            def _not_allowed(self):
                path = self._path()
                if path not in _ALLOW:
                    return self._json(404, {"error": f"no such path: {path}"})
                self._json(405, {"error": f"method {self.command} not allowed on {path}"},
                           [("Allow", _ALLOW[path])])  # fmt: skip

            def do_GET(self):
                path = self._path()
                if path == "/metrics":
                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._json(*server.health())
                else:
                    self._not_allowed()

            do_HEAD = do_GET

            def do_POST(self):
                if self._path() != "/v1/score":
                    return self._not_allowed()
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    self.close_connection = True
                    return self._json(411, {"error": "Content-Length required"})
                if length < 0 or length > server.max_body:
                    self.close_connection = True
                    return self._json(413, {"error": f"body over {server.max_body} bytes"})
                try:
                    body = self.rfile.read(length)
                except TimeoutError:
                    body = None
                if body is None or len(body) < length:
                    self.close_connection = True
                    return self._json(408, {"error": "the body did not arrive in time"})
                self._json(*server.score(body))

            do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

        return Handler
