"""One pod's lane into the apply thread (:class:`PodFeed`), shared by the pod's subscriber
(its socket thread) and the applier (``edgellm.kvevents.handler``), each through its own
methods: neither writes the other's state."""

from __future__ import annotations

import queue

from edgellm.discovery.pod import Pod
from edgellm.kvevents.metrics import PodMetrics
from edgellm.protocol.kv_events import BatchDecoder

BATCH, CLEAR, CALL, STOP = range(4)
"""The kinds of work item on the apply queue."""


class PodFeed:
    """One pod's lane into the apply thread (see the module docstring).

    Its subscriber's socket thread calls :meth:`submit`, :meth:`clear`,
    :meth:`take_resync` and :meth:`close`; the apply thread calls :meth:`dequeued`,
    :meth:`applied` and :meth:`request_resync`; :attr:`applied_seq` and
    :attr:`queue_depth` may be read from any thread. The decoder keeps the pod's stream
    state (its wire form), so one pod's form never slows another's decoding.
    """

    def __init__(self, pod: Pod, metrics: PodMetrics, queue_: queue.SimpleQueue,
                 capacity: int) -> None:  # fmt: skip
        self.pod = pod
        self.pod_key = pod.pod_key
        self.metrics = metrics
        self.decoder = BatchDecoder()
        self.applied_seq: int | None = None
        """Sequence number of the last batch applied to the index (apply thread writes)."""
        self._queue = queue_
        self._capacity = capacity
        self._enqueued = 0  # socket thread only
        self._dequeued = 0  # apply thread only
        self._resync = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queue_depth(self) -> int:
        """Batches submitted and not yet taken by the apply thread."""
        return self._enqueued - self._dequeued

    # --- the subscriber's socket thread ------------------------------------------------

    def submit(self, seq: int, payload: bytes) -> bool:
        """Queue a batch for the index; False (nothing queued) when ``capacity`` wait."""
        if self._enqueued - self._dequeued >= self._capacity:
            return False
        self._enqueued += 1
        self._queue.put((BATCH, self, seq, payload))
        return True

    def clear(self) -> None:
        """Drop the pod's entries, after everything submitted before."""
        self._queue.put((CLEAR, self))

    def take_resync(self) -> bool:
        """Whether the apply thread asked for a resync since the last call."""
        if not self._resync:
            return False
        self._resync = False
        return True

    def close(self) -> None:
        """The subscriber stopped: what is still queued is skipped."""
        self._closed = True

    # --- the apply thread --------------------------------------------------------------

    def dequeued(self) -> None:
        self._dequeued += 1

    def applied(self, seq: int) -> None:
        self.applied_seq = seq
        self.metrics.last_sequence_id.set(seq)

    def request_resync(self) -> None:
        """The index may hold wrong entries for this pod: rebuild it (socket thread acts)."""
        self._resync = True


__all__ = ["PodFeed"]
