"""A fake Kubernetes API server speaking pod list + watch at the wire, for the real client.

``GET /api/v1/pods`` and ``GET /api/v1/namespaces/{ns}/pods``, with ``labelSelector``
(equality ``k=v`` / ``k==v`` / ``k!=v``, set-based ``k in (a,b)`` / ``k notin (a,b)``,
existence ``k`` / ``!k``; a malformed selector is a 400 Status) and, with ``watch=true``,
a chunked stream of ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``
lines ending after ``timeoutSeconds``, as the API server does:

- from ``resourceVersion`` on; without one (or ``0``): first an ADDED for every object
  that matches now, then what follows ("Get State and Start at Most Recent");
- through a label selector, an object that starts matching is ADDED and one that stops
  matching is DELETED (with its new state);
- ``allowWatchBookmarks=true``: a BOOKMARK every ``bookmark_interval`` seconds and before
  the stream ends, with the version up to which this watch has seen every change (as the
  API server's: never past a change the watch did not get, e.g. one compacted away);
- a version older than the compaction point (:meth:`expire`): an ``ERROR`` event with a
  ``Status`` of code 410 in the stream, or, with ``expired_as_http``, an HTTP 410 answer.

Faults for the client: :meth:`drop_watches` ends every open watch (a proxy timeout);
:meth:`blackhole_watches` makes every open watch go silent without ending it (a proxy or
a NAT that forgets the connection: half-open TCP, nothing more ever arrives).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class FakeKubeAPI:
    def __init__(self):
        self._cond = threading.Condition()
        self.rv = 100
        self.pods: dict[str, dict] = {}
        self.history: list[tuple[int, str, dict, dict | None]] = []  # rv, kind, obj, before
        self.compacted_rv = 0
        self._generation = 0  # bumped to end every open watch
        self._blackholed = 0  # watches opened before this number go silent
        self._opened = 0
        self._stopped = False
        self.expired_as_http = False
        self.bookmark_interval = 0.5
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeKubeAPI":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._generation += 1
            self._stopped = True
            self._cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # --- cluster changes ---------------------------------------------------------------

    @staticmethod
    def pod(name, ns="default", ip="10.0.0.1", phase="Running", labels=None, annotations=None):
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {},
                         "annotations": annotations or {}, "uid": f"uid-{ns}-{name}"},
            "spec": {"containers": [{"name": "c", "image": "vllm"}]},
            "status": {"phase": phase, "podIP": ip},
        }  # fmt: skip

    def apply(self, obj: dict, *, silent: bool = False) -> None:
        """Create or replace a pod (silent: no watch event, as if compacted away)."""
        with self._cond:
            key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
            before = self.pods.get(key)
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.pods[key] = obj
            if not silent:
                self.history.append((self.rv, "MODIFIED" if before else "ADDED", obj, before))
            self._cond.notify_all()

    def delete(self, ns: str, name: str, *, silent: bool = False) -> None:
        with self._cond:
            obj = self.pods.pop(f"{ns}/{name}")
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if not silent:
                self.history.append((self.rv, "DELETED", obj, None))
            self._cond.notify_all()

    def expire(self) -> None:
        """Compact the history: every open or future watch from an older version gets 410."""
        with self._cond:
            self.compacted_rv = self.rv
            self.history.clear()
            self._generation += 1
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """End every open watch stream (as a proxy timeout would); versions stay valid."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def blackhole_watches(self) -> None:
        """Every open watch goes silent and never ends (half-open TCP); new ones work."""
        with self._cond:
            self._blackholed = self._opened
            self._cond.notify_all()

    def watch_count(self) -> int:
        """Watch requests received (a request counts before its stream is open)."""
        return sum(1 for r in self.requests if "watch=" in r.lower())

    def open_watches(self) -> int:
        """Watch streams opened so far (what :meth:`blackhole_watches` silences)."""
        with self._cond:
            return self._opened

    # --- HTTP -------------------------------------------------------------------------

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                api.requests.append(self.path)
                url = urlparse(self.path)
                q = {k: v[-1] for k, v in parse_qs(url.query).items()}
                parts = url.path.strip("/").split("/")
                if parts == ["api", "v1", "pods"]:
                    ns = None
                elif len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
                    ns = parts[3]
                else:
                    return self._json(404, _status(404, "NotFound", "no such path"))
                try:
                    selector = parse_selector(q.get("labelSelector", ""))
                except ValueError as exc:
                    return self._json(400, _status(400, "BadRequest", str(exc)))
                if q.get("watch", "").lower() in ("true", "1"):
                    return self._watch(ns, selector, q)
                with api._cond:
                    items = [p for p in api.pods.values() if _matches(p, ns, selector)]
                    body = {"kind": "PodList", "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(api.rv)}, "items": items}  # fmt: skip
                self._json(200, body)

            def _json(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, obj) -> bool:
                data = (json.dumps(obj) + "\n").encode()
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    return True
                except OSError:
                    return False

            def _watch(self, ns, selector, q):
                since = int(q.get("resourceVersion") or 0)
                expired = since and since < api.compacted_rv
                if expired and api.expired_as_http:
                    return self._json(410, _status(410, "Expired", "too old resource version"))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                deadline = time.monotonic() + float(q.get("timeoutSeconds") or 30)
                bookmarks = q.get("allowWatchBookmarks", "").lower() == "true"
                with api._cond:
                    api._opened += 1
                    number = api._opened
                    generation = api._generation
                    if expired:
                        self._chunk({"type": "ERROR", "object": _status(
                            410, "Expired", f"too old resource version: {since} ({api.compacted_rv})")})
                        return self._end()
                    sent = since
                    if not since:  # the current state first, then what follows
                        for obj in list(api.pods.values()):
                            if _matches(obj, ns, selector) and not self._chunk(
                                    {"type": "ADDED", "object": obj}):  # fmt: skip
                                return None
                        sent = api.rv
                    next_bookmark = time.monotonic() + api.bookmark_interval
                    while True:
                        if number <= api._blackholed:
                            return self._silent()
                        for rv, kind, obj, before in api.history:
                            if rv > sent:
                                event = _filtered(kind, obj, before, ns, selector)
                                if event and not self._chunk({"type": event, "object": obj}):
                                    return None
                            sent = max(sent, rv)
                        now = time.monotonic()
                        if bookmarks and now >= next_bookmark:
                            if not self._chunk(_bookmark(sent)):
                                return None
                            next_bookmark = now + api.bookmark_interval
                        left = deadline - now
                        if left <= 0 or api._generation != generation:
                            break
                        api._cond.wait(min(left, 0.5, max(0.01, next_bookmark - now)))
                    if api._generation != generation and api.compacted_rv > sent:
                        self._chunk({"type": "ERROR", "object": _status(
                            410, "Expired", "too old resource version")})  # fmt: skip
                    elif bookmarks:
                        self._chunk(_bookmark(sent))
                self._end()

            def _silent(self):
                """Hold the connection open, sending nothing, until the server stops."""
                while not api._stopped:
                    api._cond.wait(0.5)
                self.close_connection = True

            def _end(self):
                try:
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

        return Handler

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


def _bookmark(rv: int) -> dict:
    return {"type": "BOOKMARK",
            "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}}}


_TERM = re.compile(r"\s*(!?)\s*([A-Za-z0-9._/-]+)\s*(?:(==|!=|=)\s*([A-Za-z0-9._-]*)|"
                   r"\s+(in|notin)\s*\(([^)]*)\))?\s*(?:,|$)")  # fmt: skip


def parse_selector(text: str) -> list[tuple[str, str, frozenset[str]]]:
    """Terms ``(key, op, values)``, op one of ``= != in notin exists !exists``."""
    terms, pos = [], 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"unable to parse requirement: {text[pos:]!r}")
        neg, key, eq_op, eq_value, set_op, set_values = m.groups()
        if neg and (eq_op or set_op):
            raise ValueError(f"'!' before a comparison: {m.group(0)!r}")
        if eq_op:
            terms.append((key, "!=" if eq_op == "!=" else "=", frozenset([eq_value])))
        elif set_op:
            values = frozenset(v.strip() for v in set_values.split(",") if v.strip())
            terms.append((key, set_op, values))
        else:
            terms.append((key, "!exists" if neg else "exists", frozenset()))
        pos = m.end()
    return terms


def _selected(labels: dict[str, str], selector) -> bool:
    for key, op, values in selector:
        has = key in labels
        value = labels.get(key)
        if op == "=" and value not in values:
            return False
        if op == "!=" and has and value in values:
            return False
        if op == "in" and value not in values:
            return False
        if op == "notin" and has and value in values:
            return False
        if op == "exists" and not has:
            return False
        if op == "!exists" and has:
            return False
    return True


def _matches(pod: dict | None, ns: str | None, selector) -> bool:
    if pod is None:
        return False
    meta = pod["metadata"]
    if ns is not None and meta["namespace"] != ns:
        return False
    return _selected(meta.get("labels") or {}, selector)


def _filtered(kind: str, obj: dict, before: dict | None, ns, selector) -> str | None:
    """The event a watch through ``selector`` sees of a change (None: nothing)."""
    now, then = _matches(obj, ns, selector), _matches(before, ns, selector)
    if kind == "DELETED":
        return "DELETED" if now else None
    if now and then:
        return "MODIFIED"
    if now:
        return "ADDED"
    return "DELETED" if then else None
