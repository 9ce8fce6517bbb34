"""The pod provider interface and the in-memory provider the others build on.

A provider knows the current set of pods and tells listeners about changes::

    provider.add_listener(listener)     # listener.on_pod_add / on_pod_update / on_pod_delete
    provider.pods()                     # snapshot, AIBrix RangePods
    provider.get_pod(pod_key)           # AIBrix GetPod
    provider.start(); provider.stop()   # idempotent stop; context manager

Listeners are called on the provider's own thread (or the caller's, for the in-memory
provider), one call at a time, in the order the changes happened; a listener that raises
is logged and the others still run. ``on_pod_update(old, new)`` is called only when the
pod's fields differ.

:class:`StaticPodProvider` holds pods in memory: :meth:`~StaticPodProvider.add`,
:meth:`~StaticPodProvider.remove` and :meth:`~StaticPodProvider.replace` (the whole set,
emitting the difference) are what the file, unit-registry and Kubernetes providers use.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable, Protocol, runtime_checkable

from edgellm.discovery.pod import Pod

log = logging.getLogger(__name__)


class PodListener(Protocol):
    def on_pod_add(self, pod: Pod) -> None: ...

    def on_pod_update(self, old: Pod, new: Pod) -> None: ...

    def on_pod_delete(self, pod: Pod) -> None: ...


@runtime_checkable
class PodProvider(Protocol):
    def add_listener(self, listener: PodListener) -> None: ...

    def remove_listener(self, listener: PodListener) -> None: ...

    def pods(self) -> list[Pod]: ...

    def get_pod(self, pod_key: str) -> Pod | None: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...


class StaticPodProvider:
    """Pods held in memory, changed programmatically; the base of the other providers."""

    def __init__(self, pods: Iterable[Pod] = ()):
        self._pods: dict[str, Pod] = {}
        self._listeners: list[PodListener] = []
        # One change (and its notifications) at a time, in order; re-entrant so that a
        # listener may read the provider.
        self._lock = threading.RLock()
        for pod in pods:
            if pod.pod_key in self._pods:
                raise ValueError(f"duplicate pod_key {pod.pod_key!r}")
            self._pods[pod.pod_key] = pod

    # --- the provider interface ------------------------------------------------------

    def add_listener(self, listener: PodListener) -> None:
        with self._lock:
            if listener not in self._listeners:
                self._listeners.append(listener)

    def remove_listener(self, listener: PodListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def pods(self) -> list[Pod]:
        with self._lock:
            return list(self._pods.values())

    def get_pod(self, pod_key: str) -> Pod | None:
        with self._lock:
            return self._pods.get(pod_key)

    def start(self) -> "StaticPodProvider":
        return self

    def stop(self) -> None:
        pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- changes ---------------------------------------------------------------------

    def add(self, pod: Pod) -> None:
        """Add ``pod``, or update the pod with its key (an update only if it differs)."""
        with self._lock:
            old = self._pods.get(pod.pod_key)
            if old == pod:
                return
            self._pods[pod.pod_key] = pod
            if old is None:
                self._notify("on_pod_add", pod)
            else:
                self._notify("on_pod_update", old, pod)

    def remove(self, pod_key: str) -> Pod | None:
        """Remove the pod with this key; returns it (``None`` if there was none)."""
        with self._lock:
            old = self._pods.pop(pod_key, None)
            if old is not None:
                self._notify("on_pod_delete", old)
            return old

    def replace(self, pods: Iterable[Pod]) -> None:
        """Make the set exactly ``pods``: deletions first, then updates and additions."""
        new = {}
        for pod in pods:
            if pod.pod_key in new:
                raise ValueError(f"duplicate pod_key {pod.pod_key!r}")
            new[pod.pod_key] = pod
        with self._lock:
            for key in [k for k in self._pods if k not in new]:
                self.remove(key)
            for pod in new.values():
                self.add(pod)

    def _notify(self, method: str, *pods: Pod) -> None:
        for listener in list(self._listeners):
            try:
                getattr(listener, method)(*pods)
            except Exception:
                log.exception("pod listener %r failed in %s", listener, method)
