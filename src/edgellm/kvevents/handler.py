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

Work reaches the apply thread through each pod's :class:`~edgellm.kvevents.feed.PodFeed`
(``sub`` below), which its subscriber's socket thread and this thread share: the apply
thread writes only the feed's apply-side fields, never the subscriber. Batches of a feed
that was closed (its subscriber stopped) are skipped: the pod's entries are being removed
or rebuilt by its successor. ``applied_seq`` of the feed is updated after each batch;
:meth:`EventApplier.wait_applied` lets tests and benches wait for it.

An index that takes batches (``kvindex.api.BatchPrefixIndex`` with ``submit_batches``, the
Redis backend) gets them in groups (``handler_groups.py``): up to ``GROUP`` queued batches
per call, the next group submitted before the previous one's results are read, each batch
carrying its sequence number (committed with it) and its pod's lease epoch
(:meth:`EventApplier.set_epoch`, ``kvevents/leases.py``). A batch refused by its fence
(another replica took the pod over) is counted (``fenced`` error) and reported through
``on_fenced``; it is not applied.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from edgellm.kvevents.feed import PodFeed
from edgellm.kvevents.handler_groups import run_grouped
from edgellm.kvindex.api import PrefixIndex
from edgellm.protocol.kv_events import BlockRemoved, BlockStored, InvalidEvent, KVEventDecodeError

log = logging.getLogger(__name__)

_BATCH, _CLEAR, _CALL, _STOP = range(4)


class EventApplier:
    """Applies queued work to ``index`` on one thread; the feeds' sink
    (:class:`~edgellm.kvevents.feed.BatchSink`)."""

    def __init__(self, index: PrefixIndex, *, name: str = "kv-apply",
                 on_fenced: Callable[[PodFeed], None] | None = None):
        self.index = index
        self.on_fenced = on_fenced
        self.epochs: dict[str, int] = {}  # index key -> lease epoch its writes carry
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
        self._queue.put((_STOP,))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the KV event apply thread did not stop within %.1fs", timeout)

    @property
    def alive(self) -> bool:
        """The apply thread is running."""
        return self._thread.is_alive()

    # --- the sink (called by the feeds, on subscriber threads) ------------------------

    def submit_batch(self, sub: PodFeed, seq: int, payload: bytes) -> None:
        self._queue.put((_BATCH, sub, seq, payload))

    def submit_clear(self, sub: PodFeed) -> None:
        self._queue.put((_CLEAR, sub))

    def submit_call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the apply thread after everything queued before (pod removal)."""
        self._queue.put((_CALL, fn))

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted before this call has been applied."""
        done = threading.Event()
        self._queue.put((_CALL, done.set))
        return done.wait(timeout)

    def wait_applied(self, sub: PodFeed, seq: int, timeout: float) -> bool:
        """Wait until ``sub`` has applied batch ``seq`` (or a later one)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while sub.applied_seq is None or sub.applied_seq < seq:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    # Bounded wait: the apply thread reads _waiting without the lock.
                    self._cond.wait(min(left, 0.05))
            finally:
                self._waiting -= 1
        return True

    def set_epoch(self, pod_key: str, epoch: int | None) -> None:
        """The lease epoch the writes of ``pod_key`` (an index key) carry from now on."""
        if epoch is None:
            self.epochs.pop(pod_key, None)
        else:
            self.epochs[pod_key] = epoch

    # --- the apply thread ------------------------------------------------------------

    def _run(self) -> None:
        if hasattr(self.index, "submit_batches"):
            run_grouped(self)
            return
        get = self._queue.get
        while True:
            item = get()
            if item[0] == _BATCH:
                sub = item[1]
                sub.dequeued += 1
                if not sub.closed:
                    self._apply_batch(sub, item[2], item[3])
            elif not self._handle_other(item):
                return

    def _handle_other(self, item: tuple) -> bool:
        """A clear, call or stop item; False for stop."""
        kind = item[0]
        if kind == _CLEAR:
            sub = item[1]
            if not sub.closed:
                self._guarded(sub, self.index.clear_pod, sub.pod_key, None)
        elif kind == _CALL:
            try:
                item[1]()
            except Exception:
                log.exception("KV event apply call failed")
        else:
            return False
        return True

    def _guarded(self, sub: PodFeed, fn, *args):
        try:
            return fn(*args)
        except Exception:
            log.exception("index call %s failed for %s", getattr(fn, "__name__", fn), sub.pod_key)
            sub.metrics.error("index")
            sub.request_resync()
            return None

    def _apply_batch(self, sub: PodFeed, seq: int, payload: bytes) -> None:
        m = sub.metrics
        m.queue_depth.set(sub.queue_depth)
        try:
            batch = sub.decoder.decode(payload)
        except KVEventDecodeError as exc:
            log.debug("%s: batch %d does not decode: %s", sub.pod_key, seq, exc)
            m.decode_errors.inc()
            m.error("decode")
        else:
            self._apply_events(sub, batch.events)
        self._mark_applied(sub, seq)

    def _apply_events(self, sub: PodFeed, events: list) -> None:
        index = self.index
        pod_key = sub.pod_key
        context = (sub.pod.model, sub.pod.lora_id)
        m = sub.metrics
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
                sub.request_resync()
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

    def _mark_applied(self, sub: PodFeed, seq: int) -> None:
        sub.applied_seq = seq
        sub.metrics.last_sequence_id.set(seq)
        if self._waiting:  # only tests and benches wait; spare production the lock
            with self._cond:
                self._cond.notify_all()
