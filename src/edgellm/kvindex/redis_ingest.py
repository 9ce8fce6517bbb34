"""Ingest into the Redis backend: batches of events -> one BATCH script each, pipelined.

A group of batches costs one round trip (two when some parent's prefix hash must be
fetched first). What runs where:

- *here, in the client*: argument checks (``validate.py``), token packing and the prefix
  hash chain (C, ``_rows``), hashes packed as raw bytes. The chain of an event continues
  from its parent's prefix hash, which the client knows when the parent is a block of an
  earlier event of the group or a chain tail it stored before (``Tails``: decode steps,
  the next turn of a chat); otherwise one PARENTS call per shard fetches every missing
  parent of the group at once.
- *in Redis* (``redis_scripts.BATCH``): the rows, holders, leaves, budget and eviction,
  fences and committed sequence numbers. The script checks each parent's prefix hash
  against what the client chained on; another writer may have re-stored it, in which
  case the pod's later calls in the pipeline refuse (``stalled``) and are resent here
  after a rehash, so a pod's events still apply in order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

from edgellm.kvindex._rows import chain_hashes, pack_tokens
from edgellm.kvindex.api import (
    BEHIND,
    CLEARED,
    FENCED,
    REMOVED,
    STORED,
    IndexBatch,
    IndexInputError,
    StoreResult,
)
from edgellm.kvindex.hashing import engine_key, engine_keys
from edgellm.kvindex.validate import check_event, check_hashes

# The index is ``redis_index.RedisPrefixIndex`` (not imported: it imports this module).
Index = Any

__all__ = ["Group", "Tails", "finish_group", "send_group"]

_TAILS = 65536  # chain tails remembered (then forgotten at once)
_NO_PARENT = b"0" + bytes(16)
_MAX_RETRIES = 4  # rehashes of one pod per group (another writer racing ours)


def pack_u64(values: Sequence[int]) -> bytes:
    return struct.pack(f">{len(values)}Q", *values)


class Tails:
    """Prefix hashes of the chain tails this client stored, per (shard, pod)."""

    def __init__(self) -> None:
        self._by_pod: dict[tuple[str, str], dict[int, int]] = {}
        self._size = 0

    def get(self, shard: str, pod: str, engine: int) -> int | None:
        tails = self._by_pod.get((shard, pod))
        return None if tails is None else tails.get(engine)

    def put(self, shard: str, pod: str, engine: int, prefix: int) -> None:
        if self._size >= _TAILS:
            self._by_pod.clear()
            self._size = 0
        tails = self._by_pod.setdefault((shard, pod), {})
        if engine not in tails:
            self._size += 1
        tails[engine] = prefix

    def forget(self, shard: str, pod: str) -> None:
        tails = self._by_pod.pop((shard, pod), None)
        if tails:
            self._size -= len(tails)


@dataclass
class _Call:
    """One BATCH call: ``batch.events[start:stop]`` of one pod in one shard."""

    index: int  # the batch's position in the group
    batch: IndexBatch
    shard: str
    start: int = 0
    stop: int = 0
    ops: list[bytes] = field(default_factory=list)
    meta: list[tuple] = field(default_factory=list)  # per op: how to read its result
    error: Exception | None = None  # the event at ``stop`` raised it (if any)
    expect: str | None = None  # the pod's mark the call was sent expecting


class Group:
    """A group of batches sent (:func:`send_group`) whose replies are read later
    (:func:`finish_group`): the client encodes the next group while Redis runs this one."""

    def __init__(self, batches: Sequence[IndexBatch], calls: list[_Call], now: float) -> None:
        self.results: list[list[object] | str] = [[] for _ in batches]
        self.calls = calls
        self.now = now
        self.sent: object = None  # what RedisPrefixIndex._send returned
        self.done = False
        self.error: Exception | None = None  # reading its replies failed


def send_group(index: Index, batches: Sequence[IndexBatch], now: float,
               wait: bool = False) -> Group:
    """Encode ``batches`` and send them as one pipeline; the replies are read at once if
    ``wait``, else by :func:`finish_group`."""
    calls = [_Call(i, b, index._shard(b.context, b.pod_key)) for i, b in enumerate(batches)]
    group = Group(batches, calls, now)
    group.sent = _send(index, calls, set(), now, wait)
    return group


def finish_group(index: Index, group: Group) -> list[list[object] | str]:
    """Read a sent group's replies and resend what waited for a rehash (``apply_batches``'
    results, see ``api.BatchPrefixIndex``)."""
    if group.error is not None:
        raise group.error
    if group.done:
        return group.results
    retry = _receive(index, group.calls, group.results, group.sent)
    for _ in range(_MAX_RETRIES):
        if not retry:
            break
        resume = {(c.shard, c.batch.pod_key) for c in retry}
        for call in reversed(retry):  # the mark the first resent call of each pod finds
            index._marks[(call.shard, call.batch.pod_key)] = call.expect
        sent = _send(index, retry, resume, group.now, True)
        retry = _receive(index, retry, group.results, sent)
    else:
        if retry:
            raise RuntimeError("the parent prefix hashes kept changing under this writer")
    group.done = True
    return group.results


def _send(index: Index, calls: list[_Call], resume: set[tuple[str, str]],
          now: float, wait: bool) -> object:
    fetched = _fetch_parents(index, calls)
    produced: dict[tuple[str, str], dict[int, int]] = {}  # blocks stored earlier in the group
    marks = index._marks
    out = []
    for call in calls:
        key = (call.shard, call.batch.pod_key)
        _encode(index, call, fetched, produced.setdefault(key, {}))
        # A batch of the stream expects the mark its pod's previous batch committed (known
        # once one was committed here, or taken over) and commits its own: so a Redis that
        # lost writes refuses it (``behind``) instead of taking it onto a stale state.
        commit = None
        batch = call.batch
        if batch.seq is not None:
            call.expect = marks.get(key)
            if call.stop == len(batch.events) and call.error is None:
                commit = f"{batch.seq},{0 if batch.digest is None else batch.digest}"
                marks[key] = commit
            else:
                marks.pop(key, None)
        out.append((call.shard, batch, call.ops, now, commit, call.expect, key in resume))
    return index._send(out, wait)


def _receive(index: Index, calls: list[_Call], results: list,
             sent: object) -> list[_Call]:
    replies = index._receive(sent)
    retry: list[_Call] = []
    waiting: set[tuple[str, str]] = set()  # pods whose later calls must wait for a rehash
    for call, reply in zip(calls, replies):
        key = (call.shard, call.batch.pod_key)
        status = reply[0]
        status = status.decode() if isinstance(status, bytes) else status
        out = results[call.index]
        if status in (FENCED, BEHIND):
            results[call.index] = status
            index._marks.pop(key, None)
            continue
        if status == "stalled" or key in waiting:
            retry.append(_Call(call.index, call.batch, call.shard, call.start,
                               expect=call.expect))
            continue
        if status == "mismatch":
            at, actual = int(reply[1]), int.from_bytes(reply[2], "big")
            _read(call, reply[3:], out)
            event = call.meta[at - 1][1]
            index._tails.put(call.shard, call.batch.pod_key,
                             engine_key(call.batch.events[event][2]), actual)
            retry.append(_Call(call.index, call.batch, call.shard, event, expect=call.expect))
            waiting.add(key)
            continue
        _read(call, reply[1:], out)
        if call.error is not None:
            out.append(call.error)
    return retry


def _read(call: _Call, values: Sequence, out: list) -> None:
    for (kind, _event, n), value in zip(call.meta, values):
        value = int(value)
        if kind == STORED:
            if value == -1:
                out.append(StoreResult(0, unknown_parent=True, skipped=n))
            elif value < 0:
                out.append(StoreResult(0, skipped=n))
            else:
                out.append(StoreResult(value, skipped=n - value) if value < n
                           else StoreResult(value))
        else:
            out.append(value)


def _fetch_parents(index: Index, calls: list[_Call]) -> dict:
    """Prefix hashes of the parents the client cannot know: neither a block of an earlier
    event of the group nor a remembered tail. One PARENTS call per (shard, pod), after the
    group in flight (if any) has run: it may be storing them."""
    tails = index._tails
    need: dict[tuple[str, str], list[int]] = {}
    seen: dict[tuple[str, str], set[int]] = {}
    for call in calls:
        key = (call.shard, call.batch.pod_key)
        blocks = seen.setdefault(key, set())
        for event in call.batch.events[call.start:]:
            if event[0] != STORED or type(event[1]) not in (list, tuple):
                continue
            if event[1] and not all(type(h) is int and h >= 0 for h in event[1]):
                continue  # refused when encoded
            parent = event[2]
            if type(parent) is int and parent >= 0:
                parent = engine_key(parent)
                if parent not in blocks and tails.get(key[0], key[1], parent) is None:
                    need.setdefault(key, []).append(parent)
            blocks.update(engine_keys(event[1]))
    if not need:
        return {}
    keys = list(need)
    index._complete_inflight()
    replies = index._run_parents([(s, p, pack_u64(need[(s, p)])) for s, p in keys])
    fetched = {}
    for key, reply in zip(keys, replies):
        for parent, prefix in zip(need[key], reply):
            fetched[(key, parent)] = None if prefix is None else int.from_bytes(prefix, "big")
    return fetched


def _encode(index: Index, call: _Call, fetched: dict,
            produced: dict[int, int]) -> None:
    """The operations of ``call.batch.events[call.start:]`` up to the first that raises;
    ``produced``: engine hash -> prefix hash of the pod's blocks stored earlier in the group."""
    batch = call.batch
    shard, pod = call.shard, batch.pod_key
    key = (shard, pod)
    tails = index._tails
    seed = index._seed
    default_bs = index.config.block_size
    ops, meta = call.ops, call.meta
    i = call.start
    events = batch.events
    try:
        for i in range(call.start, len(events)):
            event = events[i]
            kind = event[0]
            if kind == STORED:
                _, hashes, parent, tokens, bs = event
                hashes, parent, bs = check_event(batch.context, pod, hashes, parent, tokens,
                                                 bs, default_bs)
                n = len(hashes)
                size = bs.to_bytes(4, "big")
                if not n:
                    meta.append((STORED, i, 0))
                    ops.append(b"X0" + bytes(8) + b"0" + size)
                    continue
                parent_p = None
                if parent is not None:
                    parent_p = produced.get(parent)
                    if parent_p is None:
                        parent_p = tails.get(shard, pod, parent)
                    if parent_p is None:
                        parent_p = fetched.get((key, parent))
                n_blocks = min(n, len(tokens) // bs)
                data = None
                if n_blocks:
                    try:
                        data = pack_tokens(tokens, n_blocks * bs)
                    except (OverflowError, TypeError):
                        data = None
                if data is None or (parent is not None and parent_p is None):
                    has = b"1" + parent.to_bytes(8, "big") if parent is not None else b"0" + bytes(8)
                    ops.append(b"X" + has + (b"1" if n_blocks and data is None else b"0") + size)
                    meta.append((STORED, i, n))
                    continue
                prefixes = chain_hashes(data, bs, seed, seed if parent_p is None else parent_p)
                engines = hashes if n_blocks == n else hashes[:n_blocks]
                head = (_NO_PARENT if parent is None else
                        b"1" + parent.to_bytes(8, "big") + parent_p.to_bytes(8, "big"))
                ops.append(b"S" + head + size + pack_u64(engines) + pack_u64(prefixes))
                produced.update(zip(engines, prefixes))
                # Remembered before the script ran: if it refuses the event, a child chained
                # on this tail is refused too (its parent is not held), so a wrong guess
                # costs nothing.
                tails.put(shard, pod, engines[-1], prefixes[-1])
                meta.append((STORED, i, n))
            elif kind == REMOVED:
                hashes = check_hashes(event[1])
                ops.append(b"R" + pack_u64(hashes))
                meta.append((REMOVED, i, 0))
            elif kind == CLEARED:
                tails.forget(shard, pod)
                index._marks.pop(key, None)
                produced.clear()
                ops.append(b"C")
                meta.append((CLEARED, i, 0))
            else:
                raise IndexInputError(f"unknown event kind {kind!r:.40}")
        call.stop = len(events)
    except (IndexInputError, ValueError, TypeError, IndexError) as exc:
        call.stop = i
        call.error = exc if isinstance(exc, IndexInputError) else IndexInputError(str(exc))
