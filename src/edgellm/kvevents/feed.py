"""One pod's lane into the apply thread: what the pod's subscriber (its socket thread) and
the applier (the apply thread, ``edgellm.kvevents.handler``) share, and nothing else.

Each side writes only its own fields of a :class:`PodFeed`; neither writes the other's
object (the applier used to write into the subscriber itself):

- the socket thread: :meth:`PodFeed.submit` / :meth:`PodFeed.clear` (through the
  :class:`BatchSink`), ``enqueued``, :meth:`PodFeed.take_resync`, :meth:`PodFeed.close`;
- the apply thread: ``dequeued``, ``applied_seq``, :meth:`PodFeed.request_resync`, and
  the ``decoder``, which keeps the stream's wire form (per stream, not per process).
"""

from __future__ import annotations

from typing import Protocol

from edgellm.discovery.pod import Pod
from edgellm.kvevents.metrics import PodMetrics
from edgellm.protocol.kv_events import BatchDecoder


class BatchSink(Protocol):
    """Where a feed's work goes (the applier's queue)."""

    def submit_batch(self, sub: "PodFeed", seq: int, payload: bytes) -> None:
        """Apply this batch after everything submitted before it."""

    def submit_clear(self, sub: "PodFeed") -> None:
        """Drop the pod's entries (after everything submitted before)."""


class PodFeed:
    """The lane of one pod (one data-parallel rank); see the module docstring."""

    def __init__(self, pod: Pod, metrics: PodMetrics, sink: BatchSink, capacity: int) -> None:
        self.pod = pod
        self.pod_key = pod.pod_key
        self.metrics = metrics
        self.capacity = capacity
        self._sink = sink
        self.closed = False
        """The subscriber stopped: what is still queued is skipped."""
        # Written by the socket thread only:
        self.enqueued = 0
        # Written by the apply thread only:
        self.dequeued = 0
        self.applied_seq: int | None = None
        """Sequence number of the last batch applied to the index."""
        self.resync_requested = False
        self.resync_reason = "index_error"
        self.decoder = BatchDecoder()

    @property
    def queue_depth(self) -> int:
        """Batches submitted and not yet taken by the apply thread."""
        return self.enqueued - self.dequeued

    # --- the socket thread -------------------------------------------------------------

    def submit(self, seq: int, payload: bytes) -> bool:
        """Queue a batch for the index; False (nothing queued) when ``capacity`` wait."""
        if self.enqueued - self.dequeued >= self.capacity:
            return False
        self.enqueued += 1
        self._sink.submit_batch(self, seq, payload)
        return True

    def clear(self) -> None:
        """Drop the pod's entries, after everything submitted before."""
        self._sink.submit_clear(self)

    def take_resync(self) -> bool:
        """Whether the apply thread asked for a resync since the last call."""
        if not self.resync_requested:
            return False
        self.resync_requested = False
        return True

    def close(self) -> None:
        self.closed = True

    # --- the apply thread --------------------------------------------------------------

    def request_resync(self, reason: str = "index_error") -> None:
        """The index may hold wrong entries for this pod: the socket thread rebuilds it;
        ``reason`` labels the resync in the metrics (``index_lost``: a shared index lost
        the pod's writes)."""
        self.resync_reason = reason
        self.resync_requested = True


__all__ = ["BatchSink", "PodFeed"]
