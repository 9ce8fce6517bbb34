"""A fake Kubernetes API server speaking pod list + watch at the wire, for the real client.

Implements ``GET /api/v1/pods`` and ``GET /api/v1/namespaces/{ns}/pods`` with
``labelSelector`` (equality terms), and, with ``watch=true``, a chunked stream of
``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`` lines from
``resourceVersion`` on, ending after ``timeoutSeconds``. A watch from a version older than
the compaction point gets ``ERROR`` with a ``Status`` of code 410 (Expired), as the API
server does.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class FakeKubeAPI:
    def __init__(self):
        self._cond = threading.Condition()
        self.rv = 100
        self.pods: dict[str, dict] = {}
        self.history: list[tuple[int, str, dict]] = []
        self.compacted_rv = 0
        self._generation = 0  # bumped to end every open watch
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
            kind = "MODIFIED" if key in self.pods else "ADDED"
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.pods[key] = obj
            if not silent:
                self.history.append((self.rv, kind, obj))
            self._cond.notify_all()

    def delete(self, ns: str, name: str, *, silent: bool = False) -> None:
        with self._cond:
            obj = self.pods.pop(f"{ns}/{name}")
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if not silent:
                self.history.append((self.rv, "DELETED", obj))
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

    def watch_count(self) -> int:
        return sum(1 for r in self.requests if "watch=" in r.lower())

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
                    return self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                selector = _selector(q.get("labelSelector", ""))
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
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                since = int(q.get("resourceVersion") or 0)
                deadline = time.monotonic() + float(q.get("timeoutSeconds") or 30)
                with api._cond:
                    generation = api._generation
                    if since and since < api.compacted_rv:
                        self._chunk({"type": "ERROR", "object": {
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": f"too old resource version: {since} ({api.compacted_rv})",
                            "reason": "Expired", "code": 410}})  # fmt: skip
                        return self._end()
                    sent = since
                    while True:
                        for rv, kind, obj in api.history:
                            if rv > sent and _matches(obj, ns, selector):
                                if not self._chunk({"type": kind, "object": obj}):
                                    return None
                            sent = max(sent, rv)
                        left = deadline - time.monotonic()
                        if left <= 0 or api._generation != generation:
                            break
                        api._cond.wait(min(left, 0.5))
                    if api._generation != generation and api.compacted_rv > sent:
                        self._chunk({"type": "ERROR", "object": {
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "too old resource version", "reason": "Expired",
                            "code": 410}})  # fmt: skip
                self._end()

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


def _selector(text: str) -> dict[str, str]:
    out = {}
    for term in filter(None, text.split(",")):
        key, _, value = term.partition("=")
        out[key.strip()] = value.strip().lstrip("=")
    return out


def _matches(pod: dict, ns: str | None, selector: dict[str, str]) -> bool:
    meta = pod["metadata"]
    if ns is not None and meta["namespace"] != ns:
        return False
    labels = meta.get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())
