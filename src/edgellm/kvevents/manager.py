"""The KV event manager: one subscriber per qualifying pod, all feeding one prefix index.

AIBrix ``pkg/kvevent`` manager semantics (spec 2 §2 rows 1-4, 8), with §4's fixes::

    manager = KVEventManager(pod_provider, index, config=ManagerConfig(...), registry=reg)
    manager.start()     # waits for index.is_ready() (30 s, polled every 1 s) -> TimeoutError,
                        # then subscribes to every qualifying pod and follows the provider
    manager.stop()      # idempotent: stops every client and the apply thread

- enabled only when ``config.enabled`` (default: :meth:`ManagerConfig.from_env`, i.e. both
  ``AIBRIX_PREFIX_CACHE_*`` switches ``true``); disabled, start and pod events do nothing;
- :meth:`on_pod_add` subscribes if the pod qualifies (:attr:`Pod.qualifies`);
- :meth:`on_pod_update` re-subscribes when the IP changed or the pod went from qualifying
  to not (or back) - and also when the model, LoRA id or ports changed, since a client's
  context and endpoints are fixed;
- :meth:`on_pod_delete` unsubscribes and removes all of the pod's index entries;
- subscribing is idempotent per ``pod_key``; unsubscribing stops the client, deletes its
  metric series and removes the pod's entries from the index (a pod nobody follows has
  no trustworthy entries), ordered after the pod's queued batches;
- a pod with ``dp_size`` > 1 gets one client per data-parallel rank (its own ports and
  sequence, :meth:`Pod.ranks`); each rank's entries and metric series are under its
  rank key ``<pod_key>#dp<r>``, so a rank's restart or clear leaves the other ranks'
  entries alone. :meth:`index_keys` / :meth:`pod_of` map between pods and index keys.

Replicas sharing a Redis index (``lease_config``, ``kvevents/leases.py``): each qualifying
pod is followed by the one replica holding its lease. A pod gained is taken over in the
index (its fence raised to the lease epoch, which every write then carries) and followed
from the batch committed there; a pod lost (released, taken, or a write refused by its
fence) is no longer followed, its entries left to the new holder. Stopping releases every
lease, so the successors take over at once.

For tests and benches: :meth:`applied_seq` (last sequence number applied to the index for a
pod), :meth:`wait_applied`, :meth:`wait_quiescent`.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry

from edgellm.discovery.pod import Pod
from edgellm.discovery.provider import PodProvider
from edgellm.kvevents.config import ManagerConfig
from edgellm.kvevents.feed import PodFeed
from edgellm.kvevents.handler import EventApplier
from edgellm.kvevents.leases import LeaseConfig, PodLeases
from edgellm.kvevents.metrics import KVEventMetrics
from edgellm.kvevents.subscriber import PodSubscriber
from edgellm.kvindex.api import PrefixIndex

log = logging.getLogger(__name__)


class KVEventManager:
    """Subscriptions to every qualifying pod of ``pod_provider``, applied to ``index``."""

    def __init__(
        self,
        pod_provider: PodProvider,
        index: PrefixIndex,
        *,
        config: ManagerConfig | None = None,
        registry: CollectorRegistry | None = None,
        lease_config: LeaseConfig | None = None,
    ):
        self.config = config if config is not None else ManagerConfig.from_env()
        self.enabled = self.config.enabled
        self.pod_provider = pod_provider
        self.index = index
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = KVEventMetrics(self.registry)
        self._applier = EventApplier(index, on_fenced=self._fenced)
        self._leases: PodLeases | None = None
        if lease_config is not None:
            if not hasattr(index, "take_over"):
                raise ValueError("sharing pods between replicas needs a Redis index")
            self._leases = PodLeases(index._redis, lease_config, on_gain=self._lease_gained,
                                     on_lose=self._lease_lost, registry=self.registry)
        self._subs: dict[str, list[PodSubscriber]] = {}  # pod_key -> one client per rank
        self._by_key: dict[str, PodSubscriber] = {}  # index key (pod or rank key) -> client
        self._pod_of: dict[str, str] = {}  # index key -> pod key
        self._lock = threading.RLock()  # subscriptions change one at a time
        self._state = "new"
        self._stopping = threading.Event()

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "KVEventManager":
        """Wait for the index, subscribe to the qualifying pods, follow the provider.

        Raises ``TimeoutError`` if the index is not ready within
        ``config.index_ready_timeout`` (the manager stays unstarted), ``RuntimeError`` if
        started twice. Does nothing when disabled.
        """
        if not self.enabled:
            log.info("KV event sync disabled (set %s and %s to true)",
                     "AIBRIX_PREFIX_CACHE_KV_EVENT_SYNC_ENABLED",
                     "AIBRIX_PREFIX_CACHE_USE_REMOTE_TOKENIZER")  # fmt: skip
            return self
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"manager already {self._state}")
            self._state = "starting"
        if not self._wait_index_ready():
            return self  # stopped while waiting
        with self._lock:
            if self._state != "starting":
                return self
            self._applier.start()
            self._state = "running"
        if self._leases is not None:
            self._leases.start()
        # Outside our lock: providers call listeners under their own lock, so taking theirs
        # while holding ours could deadlock. Listen first, then list: a pod that appears in
        # between is seen twice, and subscribing is idempotent.
        self.pod_provider.add_listener(self)
        if not self.running:  # stopped meanwhile
            self.pod_provider.remove_listener(self)
            return self
        for pod in self.pod_provider.pods():
            self.on_pod_add(pod)
        log.info("KV event manager started with %d subscriptions", len(self._subs))
        return self

    def _wait_index_ready(self) -> bool:
        """True once the index is ready; False if stopped meanwhile; TimeoutError."""
        deadline = time.monotonic() + self.config.index_ready_timeout
        while True:
            if self._stopping.is_set():
                return False
            try:
                if self.index.is_ready():
                    return True
            except Exception:
                log.exception("index readiness check failed")
            left = deadline - time.monotonic()
            if left <= 0:
                with self._lock:
                    if self._state == "starting":
                        self._state = "new"
                raise TimeoutError(
                    f"prefix index not ready within {self.config.index_ready_timeout:.0f}s"
                )
            self._stopping.wait(min(self.config.index_ready_poll, left))

    def stop(self) -> None:
        """Stop every client and the apply thread; safe to call twice."""
        self._stopping.set()
        with self._lock:
            if self._state in ("stopped", "new"):
                self._state = "stopped"
                return
            was_running = self._state == "running"
            self._state = "stopped"
            subs = list(self._by_key.values())
            self._subs.clear()
            self._by_key.clear()
            self._pod_of.clear()
        if was_running:
            self.pod_provider.remove_listener(self)  # outside our lock (see start)
        if self._leases is not None:
            self._leases.stop()  # released: the successors take over at once
        for sub in subs:
            sub.stop()
            sub.metrics.remove()
        self._applier.stop()
        log.info("KV event manager stopped")

    def __enter__(self) -> "KVEventManager":
        if self._state == "new":
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def applier_alive(self) -> bool:
        """The apply thread runs (false before start, after stop, or if it died)."""
        return self._applier.alive

    # --- pod events (AIBrix OnPodAdd / OnPodUpdate / OnPodDelete) ---------------------

    def on_pod_add(self, pod: Pod) -> None:
        if not self.enabled or not pod.qualifies:
            return
        with self._lock:
            if self._state == "running":
                if self._leases is not None:
                    self._leases.track(pod)  # followed once its lease is ours
                else:
                    self._subscribe(pod)

    def on_pod_update(self, old: Pod, new: Pod) -> None:
        if not self.enabled:
            return
        old_ok, new_ok = old.qualifies, new.qualifies
        changed = (old.ip, old.model, old.lora_id, old.pub_port, old.router_port, old.dp_size) != (
            new.ip, new.model, new.lora_id, new.pub_port, new.router_port, new.dp_size)  # fmt: skip
        if old_ok == new_ok and not changed:
            return
        with self._lock:
            if self._state != "running":
                return
            if old_ok or old.pod_key in self._subs:
                self._unsubscribe(old.pod_key)
            if self._leases is not None:
                self._leases.untrack(old.pod_key)
                if new_ok:
                    self._leases.track(new)
            elif new_ok:
                self._subscribe(new)

    def on_pod_delete(self, pod: Pod) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._state != "running":
                return
            if self._leases is not None:
                self._leases.untrack(pod.pod_key)
            if not self._unsubscribe(pod.pod_key):
                # Not followed, but entries may remain from an earlier subscription.
                for rank in pod.ranks():
                    self._applier.submit_call(lambda key=rank.pod_key: self.index.remove_pod(key))

    # --- subscriptions ---------------------------------------------------------------

    def _subscribe(self, pod: Pod, epoch: int | None = None,
                   marks: dict[str, tuple[int, int]] | None = None) -> None:
        """Follow ``pod``: its writes carry ``epoch``; a rank with a mark in ``marks``
        resumes after that committed batch instead of starting over."""
        if pod.pod_key in self._subs:
            return
        subs = []
        for rank in pod.ranks():
            sub = PodSubscriber(
                rank, self._applier, self.metrics.for_pod(rank.pod_key), self.config.subscriber,
            )  # fmt: skip
            self._applier.set_epoch(rank.pod_key, epoch)
            if marks and rank.pod_key in marks:
                sub.resume_from(*marks[rank.pod_key])
            subs.append(sub)
            self._by_key[rank.pod_key] = sub
            self._pod_of[rank.pod_key] = pod.pod_key
        self._subs[pod.pod_key] = subs
        try:
            for sub in subs:
                sub.start()
        except OSError as exc:  # an endpoint that cannot be (an address that is no address)
            log.error("cannot subscribe to %s at %s: %s", pod.pod_key, pod.pub_endpoint, exc)
            self._unsubscribe(pod.pod_key)
            return
        log.info("subscribed to %s at %s (%d rank(s))", pod.pod_key, pod.pub_endpoint, len(subs))

    def _unsubscribe(self, pod_key: str) -> bool:
        subs = self._subs.pop(pod_key, None)
        if subs is None:
            return False
        for sub in subs:
            self._by_key.pop(sub.pod_key, None)
            self._pod_of.pop(sub.pod_key, None)
            sub.stop()
            sub.metrics.remove()
            self._applier.submit_call(lambda key=sub.pod_key: self.index.remove_pod(key))
        log.info("unsubscribed from %s", pod_key)
        return True

    # --- leases (kvevents/leases.py) ----------------------------------------------------

    def _lease_gained(self, pod: Pod, epoch: int) -> None:
        """(The lease thread.) Fence the pod's ranks in the index, follow from their marks."""
        marks = {}
        for rank in pod.ranks():
            found = self.index.take_over((pod.model, pod.lora_id), rank.pod_key, epoch)
            if found.fenced_by is not None:
                log.warning("%s: fenced at epoch %d above lease %d: claiming again",
                            rank.pod_key, found.fenced_by, epoch)
                self._leases.raise_epoch(pod.pod_key, found.fenced_by)
                self._leases.lost(pod.pod_key, "behind_fence")
                return
            if found.seq is not None:
                marks[rank.pod_key] = (found.seq, found.digest)
        with self._lock:
            if self._state == "running":
                self._subscribe(pod, epoch, marks)

    def _lease_lost(self, pod_key: str) -> None:
        """Stop following ``pod_key`` without touching its entries (the new holder's)."""
        with self._lock:
            subs = self._subs.pop(pod_key, None)
            for sub in subs or ():
                self._by_key.pop(sub.pod_key, None)
                self._pod_of.pop(sub.pod_key, None)
                self._applier.set_epoch(sub.pod_key, None)
        for sub in subs or ():
            sub.stop()
            sub.metrics.remove()
            self.index.forget_pod(sub.pod_key)
        if subs:
            log.info("stopped following %s (lease lost)", pod_key)

    def _fenced(self, feed: PodFeed) -> None:
        """(The apply thread.) A write of ``feed``'s pod was refused: it has a new holder."""
        if self._leases is not None:
            self._leases.lost(self.pod_of(feed.pod_key))

    @property
    def leases(self) -> PodLeases | None:
        return self._leases

    # --- introspection ---------------------------------------------------------------

    def subscribed_pods(self) -> list[str]:
        with self._lock:
            return sorted(self._subs)

    def subscriber(self, key: str) -> PodSubscriber | None:
        """The client of a pod (its first rank) or of a rank, by its index key."""
        with self._lock:
            return self._by_key.get(key) or (self._subs.get(key) or [None])[0]

    def index_keys(self, pod_keys) -> list[str]:
        """The index keys of these pods: the pod key, or one rank key per rank."""
        with self._lock:
            out = []
            for key in pod_keys:
                subs = self._subs.get(key)
                out.extend([s.pod_key for s in subs] if subs else [key])
            return out

    def pod_of(self, index_key: str) -> str:
        """The pod an index key belongs to (the key itself for a pod of one rank)."""
        with self._lock:
            return self._pod_of.get(index_key, index_key)

    def applied_seq(self, pod_key: str) -> int | None:
        """Sequence number of the last batch of ``pod_key`` applied to the index, if any."""
        sub = self.subscriber(pod_key)
        return None if sub is None else sub.applied_seq

    def wait_applied(self, pod_key: str, seq: int, timeout: float = 10.0) -> bool:
        """Wait until batch ``seq`` (or later) of ``pod_key`` is applied; False on timeout."""
        sub = self.subscriber(pod_key)
        return sub is not None and self._applier.wait_applied(sub.feed, seq, timeout)

    def wait_quiescent(self, timeout: float = 10.0) -> bool:
        """Wait until no client has a replay outstanding or batches queued."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                subs = list(self._by_key.values())
            if all(s.quiescent for s in subs) and self._applier.flush(
                max(0.0, deadline - time.monotonic())
            ):
                if all(s.quiescent for s in subs):
                    return True
            self._stopping.wait(0.02)
        return False
