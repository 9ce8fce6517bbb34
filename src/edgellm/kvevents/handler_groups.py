"""The apply thread for an index that takes batches in groups (the Redis backend).

``EventApplier._run`` hands over to :func:`run_grouped` when its index has
``submit_batches`` / ``finish_batches`` (``kvindex.redis_index``). The contract stays the
one of ``handler.py`` (per pod: in sequence order, exactly the batches submitted, clears
and calls ordered with them), with two differences:

- up to ``GROUP`` consecutive queued batches (of any pods) go to the index in one call,
  and the next group is submitted before this one's results are read: the index works
  on one group while this thread decodes the next. A clear or call in the queue first
  waits for every batch before it;
- each batch carries its sequence number and its payload's digest (committed with it:
  a replica taking the pod over resumes after it, ``kvevents/leases.py``) and its pod's
  lease epoch (``EventApplier.epochs``); a batch refused by its fence is counted
  (``fenced`` error) and reported to ``EventApplier.on_fenced``.

The processing-time histogram gets, per event, its group's time divided by its events.
A failure of the index for a whole group (connection lost, server restarted) is counted
for each of its pods (``index`` error) and resyncs them: what was applied is unknown.

Lost writes (Redis restarted empty, or failed over to a replica that was behind): a batch
whose pod's committed mark is not the one this replica committed last is refused by the
index (``BEHIND``), counted (``index_behind`` error) and the pod resynced (``index_lost``):
cleared, and rebuilt from what its publisher still holds (what it does not shows in
``missed_events`` / ``partial_view``). Every ``VERIFY_S`` (between groups) the thread
asks the index which followed pods lost writes (``behind()``), so an idle pod that would
over-claim (its removals lost) is cleared and rebuilt too.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import TYPE_CHECKING, Any

from edgellm.kvevents.stream import batch_digest
from edgellm.kvindex.api import BEHIND, CLEARED, FENCED, REMOVED, STORED, IndexBatch
from edgellm.protocol.kv_events import BlockRemoved, BlockStored, InvalidEvent, KVEventDecodeError

if TYPE_CHECKING:
    from edgellm.kvevents.feed import PodFeed

log = logging.getLogger("edgellm.kvevents.handler")

# The applier is ``handler.EventApplier`` (not imported: it imports this module).
Applier = Any

GROUP = 32  # batches per index call
VERIFY_S = 0.5  # how often followed pods are checked for lost writes (busy or idle)
_BATCH, _CLEAR = 0, 1  # handler's work item kinds (_BATCH, _CLEAR, _CALL, _STOP)


class _Sent:
    """A group in the index's hands: its batches and what each became."""

    def __init__(self, items: list[tuple["PodFeed", int, list | None]], handle: object,
                 started: float) -> None:
        # (subscriber, seq, decoded events or None if undecodable), one per batch sent
        self.items = items
        self.handle = handle
        self.started = started


def run_grouped(applier: Applier) -> None:
    q = applier._queue
    pending: _Sent | None = None
    held = None  # a non-batch item taken while gathering a group
    followed: dict[str, "PodFeed"] = {}  # index key -> its feed (last seen)
    verify_at = time.monotonic() + VERIFY_S
    while True:
        if time.monotonic() >= verify_at:  # (busy or not: an idle pod may be behind)
            _verify(applier, followed)
            verify_at = time.monotonic() + VERIFY_S
        if held is not None:
            item, held = held, None
        else:
            try:
                item = q.get_nowait()
            except queue.Empty:
                if pending is not None:
                    _finish(applier, pending)
                    pending = None
                    continue
                try:
                    item = q.get(timeout=max(0.0, verify_at - time.monotonic()))
                except queue.Empty:
                    _verify(applier, followed)
                    verify_at = time.monotonic() + VERIFY_S
                    continue
        if item[0] != _BATCH:
            if pending is not None:
                _finish(applier, pending)
                pending = None
            if item[0] == _CLEAR and not item[1].closed:
                _clear(applier, item[1])
            elif not applier._handle_other(item):
                return
            continue
        items = [item]
        while len(items) < GROUP:
            try:
                nxt = q.get_nowait()
            except queue.Empty:
                break
            if nxt[0] != _BATCH:
                held = nxt
                break
            items.append(nxt)
        for it in items:
            followed[it[1].pod_key] = it[1]
        sent = _submit(applier, items)
        if pending is not None:
            _finish(applier, pending)
        pending = sent


def _clear(applier: Applier, sub: "PodFeed") -> None:
    """The pod's entries go (everywhere), and the mark committed for it in its context."""
    batch = IndexBatch((sub.pod.model, sub.pod.lora_id), sub.pod_key, [(CLEARED,)],
                       epoch=applier.epochs.get(sub.pod_key))
    result = applier._guarded(sub, applier.index.apply_batches, [batch])
    if result == [FENCED]:
        sub.metrics.error("fenced")
        if applier.on_fenced is not None:
            applier.on_fenced(sub)
        return
    applier._guarded(sub, applier.index.clear_pod, sub.pod_key, None)


def _verify(applier: Applier, followed: dict[str, "PodFeed"]) -> None:
    """Resync the followed pods whose writes the index lost (see the module docstring)."""
    for key in [k for k, sub in followed.items() if sub.closed]:
        del followed[key]
    if not followed:
        return
    try:
        behind = applier.index.behind()
    except Exception as exc:
        log.warning("checking the index for lost writes failed: %r", exc)
        return
    for pod_key in behind:
        sub = followed.get(pod_key)
        if sub is not None and not sub.closed:
            log.warning("%s: the index lost its writes: rebuilding", pod_key)
            sub.metrics.error("index_behind")
            sub.request_resync("index_lost")


def _submit(applier: Applier, items: list[tuple]) -> _Sent:
    decoded: list[tuple["PodFeed", int, list | None]] = []
    batches: list[IndexBatch] = []
    epochs = applier.epochs
    for _, sub, seq, payload in items:
        sub.dequeued += 1
        if sub.closed:
            continue
        sub.metrics.queue_depth.set(sub.queue_depth)
        try:
            events = sub.decoder.decode(payload).events
        except KVEventDecodeError as exc:
            log.debug("%s: batch %d does not decode: %s", sub.pod_key, seq, exc)
            sub.metrics.decode_errors.inc()
            sub.metrics.error("decode")
            events = None
        decoded.append((sub, seq, events))
        ops = []
        for ev in events or ():
            kind = type(ev)
            if kind is BlockStored:
                ops.append((STORED, ev.block_hashes, ev.parent_block_hash, ev.token_ids,
                            ev.block_size))
            elif kind is BlockRemoved:
                ops.append((REMOVED, ev.block_hashes))
            elif kind is not InvalidEvent:
                ops.append((CLEARED,))
        batches.append(IndexBatch((sub.pod.model, sub.pod.lora_id), sub.pod_key, ops,
                                  seq=seq, digest=batch_digest(payload),
                                  epoch=epochs.get(sub.pod_key)))
    started = time.perf_counter()
    try:
        handle = applier.index.submit_batches(batches) if batches else None
    except Exception as exc:
        handle = exc
    return _Sent(decoded, handle, started)


def _finish(applier: Applier, sent: _Sent) -> None:
    try:
        _finish_group(applier, sent)
    except Exception:  # a bug must not stop the apply thread: the pods are rebuilt
        log.exception("applying a group of %d batches failed", len(sent.items))
        for sub, seq, _ in sent.items:
            sub.metrics.error("index")
            sub.request_resync()
            applier._mark_applied(sub, seq)


def _finish_group(applier: Applier, sent: _Sent) -> None:
    results: list | Exception
    if sent.handle is None:
        results = []
    elif isinstance(sent.handle, Exception):
        results = sent.handle
    else:
        try:
            results = applier.index.finish_batches(sent.handle)
        except Exception as exc:
            results = exc
    if isinstance(results, Exception):
        log.error("the index failed a group of %d batches: %r", len(sent.items), results)
        for sub in {id(s): s for s, _, _ in sent.items}.values():
            sub.metrics.error("index")
            sub.request_resync()
        for sub, seq, _ in sent.items:
            applier._mark_applied(sub, seq)
        return
    n_events = sum(len(ev) for _, _, ev in sent.items if ev) or 1
    per_event = (time.perf_counter() - sent.started) / n_events
    # (Every item went to the index, an undecodable one as an empty batch: its mark.)
    for (sub, seq, events), result in zip(sent.items, results):
        if events is not None:
            _tally(applier, sub, events, result, per_event)
        applier._mark_applied(sub, seq)


def _tally(applier: Applier, sub: "PodFeed", events: list, result: object,
           per_event: float) -> None:
    m = sub.metrics
    counts = {"BlockStored": 0, "BlockRemoved": 0, "AllBlocksCleared": 0}
    if result in (FENCED, BEHIND):
        for ev in events:
            if type(ev) is not InvalidEvent:
                counts[type(ev).__name__] += 1
        for name, n in counts.items():
            if n:
                m.received[name].inc(n)
        if result == BEHIND:
            m.error("index_behind")
            sub.request_resync("index_lost")
        else:
            m.error("fenced")
            if applier.on_fenced is not None:
                applier.on_fenced(sub)
        return
    results = iter(result)  # type: ignore[call-overload]
    observe = m.processing_duration.observe
    failed = False
    for ev in events:
        kind = type(ev)
        if kind is InvalidEvent:
            log.debug("%s: %s skipped: %s", sub.pod_key, ev.kind, ev.reason)
            m.error("invalid_event")
            m.received[ev.kind].inc()
            continue
        name = kind.__name__
        counts[name] += 1
        if failed:
            continue
        value = next(results, None)
        if isinstance(value, Exception):
            log.error("index rejected a %s of %s: %s", name, sub.pod_key, value)
            m.error("index")
            sub.request_resync()
            failed = True
            continue
        if kind is BlockStored and value.unknown_parent:
            m.unknown_parent.inc()
        m.processed[name].inc()
        observe(per_event)
    for name, n in counts.items():
        if n:
            m.received[name].inc(n)
