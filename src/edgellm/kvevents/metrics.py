"""Prometheus series of the KV event pipeline, on a registry that is passed in.

The eleven series of AIBrix (``pkg/kvevent`` metrics), same names, types and labels; every
one carries ``pod_key``:

=================================================  =========  ===================
name                                               type       extra labels
=================================================  =========  ===================
kvcache_zmq_connections_total                      counter
kvcache_zmq_disconnections_total                   counter
kvcache_zmq_reconnect_attempts_total               counter
kvcache_zmq_events_received_total                  counter    event_type
kvcache_zmq_events_processed_total                 counter    event_type
kvcache_zmq_event_processing_duration_seconds      histogram
kvcache_zmq_missed_events_total                    counter
kvcache_zmq_replay_requests_total                  counter
kvcache_zmq_errors_total                           counter    error_type
kvcache_zmq_connection_status                      gauge (0/1)
kvcache_zmq_last_sequence_id                       gauge
=================================================  =========  ===================

and what the replay/resync behaviour adds: ``kvcache_zmq_replayed_batches_total``,
``kvcache_zmq_resyncs_total{reason}``, ``kvcache_zmq_queue_overflows_total``,
``kvcache_zmq_unknown_parent_total``, ``kvcache_zmq_decode_errors_total``,
``kvcache_zmq_duplicate_batches_total``, ``kvcache_zmq_queue_depth`` (gauge),
``kvcache_zmq_partial_view`` (gauge 0/1).

For a pod of several data-parallel ranks each rank has its own series, ``pod_key`` being
the rank key ``<pod_key>#dp<r>`` (each rank is its own stream and connection).

Meanings:

- *connections* / *disconnections* / *connection_status*: the live (SUB) socket's TCP
  connection to the pod's publisher, from the socket's monitor events (connected,
  disconnected); *reconnect_attempts*: the socket's connect retries plus re-creations of
  the replay (DEALER) socket after a replay timeout;
- *missed events*: sequence numbers the live stream skipped (a gap, counted when the batch
  after it proves genuine, whether a replay then recovered the gap or not - AIBrix's
  meaning), plus those a start or rebuild replay needed but the publisher no longer held;
- *partial view*: 1 while the pod's entries were rebuilt from a stream the publisher no
  longer holds from seq 0 (a late start, a lost range): blocks of the batches nobody can
  replay are missing from the index until the engine evicts or clears them;
- *received* counts events of live and replayed batches; *processed* those applied to the
  index; the histogram times the application of one event;
- *resyncs* ``reason``: ``restart`` (the stream went back: a new engine), ``range_lost``
  (a gap the publisher no longer holds), ``gap_unrecoverable`` (a gap while the replay
  channel was down), ``recover`` (rebuilt once the replay channel was back),
  ``index_error``, ``index_lost`` (a shared index lost writes of the pod: Redis restarted
  empty or failed over to a replica that was behind; rebuilt from replay, and what the
  publisher no longer holds shows in *missed events* and *partial view*);
- ``event_type`` is ``BlockStored``/``BlockRemoved``/``AllBlocksCleared``.

``error_type`` (every malformed or refused input is counted under exactly one):

- ``decode``: a payload that is not a well-formed event batch (also in *decode_errors*);
- ``invalid_event``: a well-formed BlockStored of a batch whose token count, block size or
  token ids are inconsistent (``edgellm.protocol.kv_events.InvalidEvent``): skipped, the
  batch's other events apply;
- ``protocol``: a live message that is not ``[topic, seq, payload]`` / ``[seq, payload]``
  with an 8-byte non-negative seq;
- ``replay_protocol``: a replay message that is malformed, unrequested, or repeats a seq;
- ``stale_batch``: a well-formed live batch dropped because the publisher's replay showed
  it cannot be applied: other bytes than the publisher's batch of that seq, a seq the
  publisher never sent, or older than anything it still holds after a range was lost;
- ``replay_timeout``: a replay request unanswered within the replay timeout;
- ``index``: the index rejected an event (the pod is then resynced);
- ``fenced``: a shared index refused a batch because another replica took the pod over
  (its lease, ``kvevents/leases.py``); this replica stops following the pod;
- ``index_behind``: a shared index refused a batch because the batch committed there
  before it is not the one this replica committed last (writes were lost: a restart or
  failover); the pod is resynced (``index_lost``);
- ``socket``: the client's thread failed.

:meth:`PodMetrics.remove` deletes all of a pod's series (its client stopped).
"""

from __future__ import annotations

import threading
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

EVENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared")


class KVEventMetrics:
    """The metric families; one instance per registry."""

    def __init__(self, registry: CollectorRegistry):
        pod = ["pod_key"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, pod + list(extra), registry=registry)

        self.connections = counter("kvcache_zmq_connections_total", "ZMQ connections established")
        self.disconnections = counter("kvcache_zmq_disconnections_total", "ZMQ disconnections")
        self.reconnect_attempts = counter(
            "kvcache_zmq_reconnect_attempts_total", "ZMQ reconnection attempts"
        )
        self.events_received = counter(
            "kvcache_zmq_events_received_total", "KV events received", ("event_type",)
        )
        self.events_processed = counter(
            "kvcache_zmq_events_processed_total", "KV events applied to the index", ("event_type",)
        )
        self.processing_duration = _LatencyHistograms(
            "kvcache_zmq_event_processing_duration_seconds",
            "Time to apply one KV event to the index",
        )
        registry.register(self.processing_duration)
        self.missed_events = counter(
            "kvcache_zmq_missed_events_total",
            "Sequence numbers skipped by the live stream or no longer held by the publisher",
        )
        self.replay_requests = counter("kvcache_zmq_replay_requests_total", "Replay requests sent")
        self.errors = counter("kvcache_zmq_errors_total", "Errors", ("error_type",))
        self.connection_status = Gauge(
            "kvcache_zmq_connection_status", "1 when connected to the pod's publisher", pod,
            registry=registry,
        )  # fmt: skip
        self.last_sequence_id = Gauge(
            "kvcache_zmq_last_sequence_id", "Sequence number of the last applied batch", pod,
            registry=registry,
        )  # fmt: skip
        self.replayed_batches = counter(
            "kvcache_zmq_replayed_batches_total", "Batches received by replay and applied"
        )
        self.resyncs = counter(
            "kvcache_zmq_resyncs_total", "Pod entries dropped and rebuilt", ("reason",)
        )
        self.queue_overflows = counter(
            "kvcache_zmq_queue_overflows_total", "Live batches dropped because the queue was full"
        )
        self.unknown_parent = counter(
            "kvcache_zmq_unknown_parent_total", "BlockStored events whose parent the index lacks"
        )
        self.decode_errors = counter(
            "kvcache_zmq_decode_errors_total", "Payloads that failed to decode"
        )
        self.duplicates = counter(
            "kvcache_zmq_duplicate_batches_total", "Live copies of replayed batches dropped"
        )
        self.queue_depth = Gauge(
            "kvcache_zmq_queue_depth", "Batches of the pod waiting for the index", pod,
            registry=registry,
        )  # fmt: skip
        self.partial_view = Gauge(
            "kvcache_zmq_partial_view",
            "1 while the pod's entries come from a stream not replayable from seq 0", pod,
            registry=registry,
        )  # fmt: skip

    def for_pod(self, pod_key: str) -> "PodMetrics":
        return PodMetrics(self, pod_key)


class PodMetrics:
    """One pod's children of every family, created on first use and removable at once."""

    def __init__(self, families: KVEventMetrics, pod_key: str):
        self._f = families
        self.pod_key = pod_key
        self._lock = threading.Lock()
        self._labelled: set[tuple[str, tuple[str, ...]]] = set()
        self._removed = False
        f = families
        self.connections = f.connections.labels(pod_key)
        self.disconnections = f.disconnections.labels(pod_key)
        self.reconnect_attempts = f.reconnect_attempts.labels(pod_key)
        self.processing_duration = f.processing_duration.labels(pod_key)
        self.missed_events = f.missed_events.labels(pod_key)
        self.replay_requests = f.replay_requests.labels(pod_key)
        self.connection_status = f.connection_status.labels(pod_key)
        self.last_sequence_id = f.last_sequence_id.labels(pod_key)
        self.replayed_batches = f.replayed_batches.labels(pod_key)
        self.queue_overflows = f.queue_overflows.labels(pod_key)
        self.unknown_parent = f.unknown_parent.labels(pod_key)
        self.decode_errors = f.decode_errors.labels(pod_key)
        self.duplicates = f.duplicates.labels(pod_key)
        self.queue_depth = f.queue_depth.labels(pod_key)
        self.partial_view = f.partial_view.labels(pod_key)
        self.received = {t: self._child("events_received", t) for t in EVENT_TYPES}
        self.processed = {t: self._child("events_processed", t) for t in EVENT_TYPES}

    def _child(self, family: str, value: str):
        with self._lock:
            if self._removed:  # a late increment must not resurrect a deleted series
                return None
            self._labelled.add((family, (value,)))
            return getattr(self._f, family).labels(self.pod_key, value)

    def error(self, error_type: str, n: int = 1) -> None:
        child = self._child("errors", error_type)
        if child is not None:
            child.inc(n)

    def resync(self, reason: str) -> None:
        child = self._child("resyncs", reason)
        if child is not None:
            child.inc()

    def remove(self) -> None:
        """Delete every series of this pod (idempotent)."""
        with self._lock:
            if self._removed:
                return
            self._removed = True
            labelled = list(self._labelled)
        f = self._f
        for family in (
            f.connections, f.disconnections, f.reconnect_attempts,
            f.missed_events, f.replay_requests, f.connection_status, f.last_sequence_id,
            f.replayed_batches, f.queue_overflows, f.unknown_parent, f.decode_errors,
            f.duplicates, f.queue_depth, f.partial_view,
        ):  # fmt: skip
            _remove(family, self.pod_key)
        for name, extra in labelled:
            _remove(getattr(f, name), self.pod_key, *extra)
        f.processing_duration.remove(self.pod_key)


def _remove(family, *labels: str) -> None:
    try:
        family.remove(*labels)
    except KeyError:
        pass


BUCKETS = (1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0)


class _Latency:
    """One pod's histogram, written by the apply thread only (no lock: ~0.2 us/observe,
    where prometheus_client's Histogram costs ~1.6 us, too much per event)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class _LatencyHistograms:
    """A histogram family with label ``pod_key``, exposed at scrape time."""

    def __init__(self, name: str, documentation: str):
        self.name = name
        self.documentation = documentation
        self._pods: dict[str, _Latency] = {}
        self._lock = threading.Lock()

    def labels(self, pod_key: str) -> _Latency:
        with self._lock:
            return self._pods.setdefault(pod_key, _Latency())

    def remove(self, pod_key: str) -> None:
        with self._lock:
            self._pods.pop(pod_key, None)

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=["pod_key"])]

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=["pod_key"])
        with self._lock:
            pods = list(self._pods.items())
        for pod_key, latency in pods:
            counts = list(latency.counts)  # a snapshot: the apply thread keeps writing
            cumulative, buckets = 0, []
            for bound, n in zip(BUCKETS + (float("inf"),), counts):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([pod_key], buckets, latency.total)
        yield family
