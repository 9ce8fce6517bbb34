"""Pods from the Kubernetes API: list + watch with the official ``kubernetes`` client.

``start()`` lists the pods (namespace or all namespaces, optional label selector: equality
and set-based terms are the API server's business) and takes the list's
``resourceVersion``; a thread then watches from it, applying ADDED / MODIFIED / DELETED
events to the listeners and remembering the last resourceVersion (BOOKMARKs included; a
pod that leaves the selection arrives as DELETED). Each watch request ends after
``watch_timeout`` seconds (server side) and is renewed from the last version. The client
side gives up on a watch that stays silent for ``watch_timeout + read_slack`` seconds (a
half-open connection: a proxy or NAT that forgot it) and renews it at once; connecting
has ``connect_timeout``, a list ``list_timeout``. When the version has expired (HTTP 410
Gone, as a status or an ERROR event) the provider lists again and applies the
difference; other failures are retried after ``retry_delay`` (doubling up to 30 s).

Pods map to :class:`~edgellm.discovery.pod.Pod` through AIBrix's labels
(:func:`~edgellm.discovery.pod.pod_from_labels`): ``pod_key = namespace/name``, ``ip =
status.podIP``, ``phase = status.phase``. The KV event ports default to 5557/5558 and may
be set per pod with the annotations ``kvevents.edgellm.io/pub-port`` and
``kvevents.edgellm.io/router-port``; ``kvevents.edgellm.io/dp-size`` declares data-parallel
ranks (rank r on both ports + r).

``stop()`` returns within a couple of seconds; a watch request still open finishes in the
background (at most ``watch_timeout``) and its thread exits without notifying anyone.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ReadTimeoutError

from edgellm.discovery.pod import (
    DEFAULT_PUB_PORT,
    DEFAULT_ROUTER_PORT,
    MAX_DP_SIZE,
    Pod,
    pod_from_labels,
)
from edgellm.discovery.provider import StaticPodProvider

log = logging.getLogger(__name__)

PUB_PORT_ANNOTATION = "kvevents.edgellm.io/pub-port"
ROUTER_PORT_ANNOTATION = "kvevents.edgellm.io/router-port"
DP_SIZE_ANNOTATION = "kvevents.edgellm.io/dp-size"
_GONE = 410


def pod_from_k8s(obj: dict[str, Any]) -> Pod | None:
    """A Pod from a Kubernetes pod object (a dict as on the wire); None if unusable."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if not name:
        return None
    annotations = meta.get("annotations") or {}

    def number(key: str, default: int, top: int) -> int:
        try:
            value = int(annotations.get(key, default))
        except (TypeError, ValueError):
            return default
        return value if 0 < value <= top else default

    try:
        return pod_from_labels(
            f"{namespace}/{name}",
            status.get("podIP") or "",
            {str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
            status.get("phase") or "",
            pub_port=number(PUB_PORT_ANNOTATION, DEFAULT_PUB_PORT, 65535),
            router_port=number(ROUTER_PORT_ANNOTATION, DEFAULT_ROUTER_PORT, 65535),
            dp_size=number(DP_SIZE_ANNOTATION, 1, MAX_DP_SIZE),
            annotations={str(k): str(v) for k, v in annotations.items()},
        )
    except ValueError as exc:
        log.warning("pod %s/%s ignored: %s", namespace, name, exc)
        return None


class KubernetesPodProvider(StaticPodProvider):
    """Pods of a cluster, kept current by list + watch (see the module docstring)."""

    def __init__(self, api_client: k8s.ApiClient | None = None, *, namespace: str | None = None,
                 label_selector: str | None = None, watch_timeout: int = 300,
                 retry_delay: float = 1.0, max_retry_delay: float = 30.0,
                 connect_timeout: float = 10.0, read_slack: float = 10.0,
                 list_timeout: float = 60.0):  # fmt: skip
        super().__init__()
        if api_client is None:
            api_client = _default_api_client()
        self._api_client = api_client
        self._api = k8s.CoreV1Api(api_client)
        self.namespace = namespace
        self.label_selector = label_selector
        self.watch_timeout = int(watch_timeout)
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self._watch_timeouts = (connect_timeout, self.watch_timeout + read_slack)
        self._list_timeouts = (connect_timeout, list_timeout)
        self.resource_version: str | None = None
        self.relists = 0
        self.silent_watches = 0
        self._stop = threading.Event()
        self._watch: k8s_watch.Watch | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "KubernetesPodProvider":
        """List once (raising ``ApiException`` / connection errors), then watch."""
        if self._thread is None:
            self._list()
            self._thread = threading.Thread(target=self._run, name="k8s-pods", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    # --- list and watch --------------------------------------------------------------

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.label_selector:
            kw["label_selector"] = self.label_selector
        if self.namespace:
            return {"namespace": self.namespace, **kw}
        return kw

    def _list_fn(self):
        return self._api.list_namespaced_pod if self.namespace else self._api.list_pod_for_all_namespaces

    def _list(self) -> None:
        fn = self._list_fn()
        resp = fn(_preload_content=False, _request_timeout=self._list_timeouts, **self._kwargs())
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        pods = [p for p in (pod_from_k8s(o) for o in body.get("items") or []) if p is not None]
        self.resource_version = (body.get("metadata") or {}).get("resourceVersion") or None
        if not self._stop.is_set():
            self.replace(pods)

    def _run(self) -> None:
        delay = self.retry_delay
        while not self._stop.is_set():
            # Never a watch without a version: it would start from the current state and
            # could not tell which of our pods were deleted meanwhile. List instead.
            if self.resource_version is not None or self._relist():
                try:
                    self._watch_once()
                    delay = self.retry_delay
                    continue
                except ReadTimeoutError:
                    # Nothing, not even the end of the stream, for longer than the watch
                    # lasts: the connection is dead without knowing it. Watch again now.
                    self.silent_watches += 1
                    log.info("pod watch silent for %.0fs; renewing it", self._watch_timeouts[1])
                    delay = self.retry_delay
                    continue
                except ApiException as exc:
                    if exc.status == _GONE:
                        log.info("pod watch expired (410); listing again")
                        self.resource_version = None
                        if self._relist():
                            delay = self.retry_delay
                            continue
                    else:
                        log.warning("pod watch failed: %s", exc)
                except Exception as exc:  # connection refused/reset, bad chunk...
                    log.warning("pod watch failed: %r", exc)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self.max_retry_delay)

    def _relist(self) -> bool:
        try:
            self._list()
        except Exception as exc:
            log.warning("listing pods failed: %r", exc)
            self.resource_version = None
            return False
        self.relists += 1
        return True

    def _watch_once(self) -> None:
        w = k8s_watch.Watch()
        self._watch = w
        kw = self._kwargs()
        kw.update(timeout_seconds=self.watch_timeout, allow_watch_bookmarks=True,
                  _request_timeout=self._watch_timeouts)
        if self.resource_version:
            kw["resource_version"] = self.resource_version
        for event in w.stream(self._list_fn(), **kw):
            if self._stop.is_set():
                w.stop()
                return
            self._on_event(event)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("raw_object") or {}
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self.resource_version = rv or self.resource_version
            return
        pod = pod_from_k8s(obj)
        if pod is not None:
            if kind in ("ADDED", "MODIFIED"):
                self.add(pod)
            elif kind == "DELETED":
                self.remove(pod.pod_key)
        if rv:
            self.resource_version = rv


def _default_api_client() -> k8s.ApiClient:
    """In-cluster configuration, else the local kubeconfig."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return k8s.ApiClient()
