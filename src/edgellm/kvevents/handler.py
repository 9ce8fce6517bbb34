"""The apply thread: decodes each pod's batches and applies them to the prefix index.

One :class:`EventApplier` per manager (so per index): a single thread takes work items in
submission order from an unbounded queue whose per-pod depth the subscribers bound
(``SubscriberConfig.queue_capacity``). This matches the index contract
(``edgellm.kvindex.api``): calls for one pod never interleave and arrive in that pod's
sequence order.

Event handling (AIBrix ``eventHandler`` with the §4 fixes):

- BlockStored -> ``index.process_block_stored(context, pod_key, block_hashes,
  parent_block_hash, token_ids, block_size)`` with context ``(pod.model, pod.lora_id)``:
  the pod's ``model.aibrix.ai/name`` and ``model.aibrix.ai/lora-id`` labels, as AIBrix's
  ``eventHandler`` builds it (its ``modelName`` / ``loraID`` are the pod's; the event's
  ``lora_id`` - an engine-local adapter number - is not used); a result with
  ``unknown_parent`` is counted;
- BlockRemoved -> ``index.process_block_removed(None, pod_key, block_hashes)``: only this
  pod's holding goes; the index resolves the context through the pod's own hash map;
- AllBlocksCleared -> ``index.clear_pod(pod_key)``: the engine dropped its whole cache,
  every context of the pod (LoRA blocks included);
- a payload that does not decode is counted (``decode`` error) and skipped; its sequence
  number still counts as applied, so the stream goes on;
- an :class:`~edgellm.protocol.kv_events.InvalidEvent` (a well-formed BlockStored whose
  token count, block size or token ids are inconsistent) is counted (``invalid_event``
  error, and as received) and skipped; the batch's other events apply;
- an exception from the index is counted (``index`` error) and the pod is resynced, since
  its entries may now be wrong.

Each pod (each data-parallel rank) reaches the apply thread through its :class:`PodFeed`,
the one object its subscriber's socket thread and the apply thread share, each through
its own methods. Batches of a feed that was closed (its subscriber stopped) are skipped:
the pod's entries are being removed or rebuilt by its successor. ``applied_seq`` is set
after each batch; :meth:`EventApplier.wait_applied` lets tests and benches wait for it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from edgellm.discovery.pod import Pod
from edgellm.kvevents.feed import BATCH, CALL, CLEAR, STOP, PodFeed
from edgellm.kvevents.metrics import PodMetrics
from edgellm.kvindex.api import PrefixIndex
from edgellm.protocol.kv_events import BlockRemoved, BlockStored, InvalidEvent, KVEventDecodeError

log = logging.getLogger(__name__)

class EventApplier:
    """Applies queued work to ``index`` on one thread; :meth:`feed` opens a pod's lane."""

    def __init__(self, index: PrefixIndex, *, name: str = "kv-apply"):
        self.index = index
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._cond = threading.Condition()
        self._waiting = 0
        self._state = "new"
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"applier already {self._state}")
            self._state = "running"
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Apply what is queued, then stop (idempotent)."""
        with self._lock:
            if self._state != "running":
                self._state = "stopped"
                return
            self._state = "stopped"
        self._queue.put((STOP,))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the KV event apply thread did not stop within %.1fs", timeout)

    @property
    def alive(self) -> bool:
        """The apply thread is running."""
        return self._thread.is_alive()

    def feed(self, pod: Pod, metrics: PodMetrics, capacity: int) -> PodFeed:
        """A lane for one pod (rank) whose batches ``capacity`` at most may wait."""
        return PodFeed(pod, metrics, self._queue, capacity)

    def submit_call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the apply thread after everything queued before (pod removal)."""
        self._queue.put((CALL, fn))

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted before this call has been applied."""
        done = threading.Event()
        self._queue.put((CALL, done.set))
        return done.wait(timeout)

    def wait_applied(self, feed: PodFeed, seq: int, timeout: float) -> bool:
        """Wait until ``feed``'s batch ``seq`` (or a later one) is applied."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while feed.applied_seq is None or feed.applied_seq < seq:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    # Bounded wait: the apply thread reads _waiting without the lock.
                    self._cond.wait(min(left, 0.05))
            finally:
                self._waiting -= 1
        return True

    # --- the apply thread ------------------------------------------------------------

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            kind = item[0]
            if kind == BATCH:
                feed = item[1]
                feed.dequeued()
                if not feed.closed:
                    self._apply_batch(feed, item[2], item[3])
            elif kind == CLEAR:
                feed = item[1]
                if not feed.closed:
                    self._guarded(feed, self.index.clear_pod, feed.pod_key, None)
            elif kind == CALL:
                try:
                    item[1]()
                except Exception:
                    log.exception("KV event apply call failed")
            else:
                return

    def _guarded(self, feed: PodFeed, fn, *args):
        try:
            return fn(*args)
        except Exception:
            log.exception("index call %s failed for %s", getattr(fn, "__name__", fn), feed.pod_key)
            feed.metrics.error("index")
            feed.request_resync()
            return None

    def _apply_batch(self, feed: PodFeed, seq: int, payload: bytes) -> None:
        m = feed.metrics
        m.queue_depth.set(feed.queue_depth)
        try:
            batch = feed.decoder.decode(payload)
        except KVEventDecodeError as exc:
            log.debug("%s: batch %d does not decode: %s", feed.pod_key, seq, exc)
            m.decode_errors.inc()
            m.error("decode")
        else:
            self._apply_events(feed, batch.events)
        feed.applied(seq)
        if self._waiting:  # only tests and benches wait; spare production the lock
            with self._cond:
                self._cond.notify_all()

    def _apply_events(self, feed: PodFeed, events: list) -> None:
        index = self.index
        pod_key = feed.pod_key
        context = (feed.pod.model, feed.pod.lora_id)
        m = feed.metrics
        n_stored = n_removed = n_cleared = 0
        observe = m.processing_duration.observe
        clock = time.perf_counter
        failed: str | None = None
        t0 = clock()
        for i, ev in enumerate(events):
            try:
                kind = type(ev)
                if kind is BlockStored:
                    n_stored += 1
                    result = index.process_block_stored(
                        context, pod_key, ev.block_hashes, ev.parent_block_hash, ev.token_ids,
                        ev.block_size,
                    )  # fmt: skip
                    if result.unknown_parent:
                        m.unknown_parent.inc()
                elif kind is BlockRemoved:
                    n_removed += 1
                    index.process_block_removed(None, pod_key, ev.block_hashes)
                elif kind is InvalidEvent:
                    log.debug("%s: %s skipped: %s", pod_key, ev.kind, ev.reason)
                    m.error("invalid_event")
                    m.received[ev.kind].inc()
                    t0 = clock()
                    continue
                else:
                    n_cleared += 1
                    index.clear_pod(pod_key, None)
            except Exception:
                log.exception("index rejected a %s of %s", type(ev).__name__, pod_key)
                m.error("index")
                feed.request_resync()
                failed = type(ev).__name__
                rest = events[i + 1 :]
                break
            # One clock read per event: each event's time runs from the previous one's end.
            t1 = clock()
            observe(t1 - t0)
            t0 = t1
        counts = {"BlockStored": n_stored, "BlockRemoved": n_removed,
                  "AllBlocksCleared": n_cleared}  # fmt: skip
        for name, n in counts.items():
            if n:
                m.processed[name].inc(n - (failed == name))
        if failed is not None:  # received counts every event of the batch, applied or not
            for ev in rest:
                counts[type(ev).__name__] += 1
        for name, n in counts.items():
            if n:
                m.received[name].inc(n)
