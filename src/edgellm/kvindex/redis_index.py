"""The prefix index in Redis/Valkey (one server or Redis Cluster), shared by replicas.

Same semantics and answers as :class:`edgellm.kvindex.memory.MemoryPrefixIndex` for the same
calls on one Redis (a property test drives both against one reference model): same hash
chain (computed here, in the client, in C), same argument checks (``validate.py``), same
rules for events that are not indexed, same limits and eviction order (``memory_lru.py``)
- except that one call evicts at most 256 blocks (a script blocks Redis while it runs):
with a gap between a limit and its low watermark above that (limits above 16,384), the
calls that follow close it, so the index stays within a few hundred blocks of its limit.
Redis Cluster differs as ``redis_keys.py`` says (limits per shard).

Where the work goes (and why):

- every change is a Lua script (``redis_scripts.py``, on ``redis_lua.py``), atomic in its
  shard; one script per engine batch, and :meth:`RedisPrefixIndex.apply_batches` sends a
  group of batches as one pipeline (``redis_ingest.py``): a round trip per group, not per
  block or event;
- hashes travel as raw bytes packed in one argument per event (redis-py spends ~0.5 us per
  argument, ~260 us for a prompt's 512), rows and holders are short binary strings in
  small listpack-encoded bucket hashes (``redis_lua.py``): ~60 bytes per block instead of
  ~160;
- a lookup is one script (per shard: one, unless pods are spread over a cluster,
  ``redis_keys.py``) walking the prompt's hashes inside Redis;
- eviction runs inside the store script: a store over the budget costs no extra round trip.
  Redis' own key expiry is not used: an entry's life is decided by the engine's events and
  by LRU under the budget, and a lease's by ``kvevents/leases.py``; idle contexts are
  dropped by the sweep as in memory.

Fencing: a batch may carry its writer's lease epoch and the sequence number it ends (see
``api.IndexBatch``): stale writers are refused and a new writer resumes after the committed
sequence number (:meth:`RedisPrefixIndex.take_over`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import redis

from edgellm.kvindex.api import (
    CLEARED,
    REMOVED,
    STORED,
    ContextKey,
    IndexBatch,
    PodMatch,
    StoreResult,
)
from edgellm.kvindex.config import IndexConfig, low_watermark
from edgellm.kvindex.redis_ingest import Group, Tails, finish_group, pack_u64, send_group
from edgellm.kvindex.redis_keys import Placement
from edgellm.kvindex.redis_read import PromptHasher, match, stats
from edgellm.kvindex.redis_runner import ScriptRunner
from edgellm.kvindex.validate import (
    check_context,
    check_event,
    check_hashes,
    check_pod,
    context_id,
)

__all__ = ["RedisPrefixIndex", "TakeOver"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TakeOver:
    """What :meth:`RedisPrefixIndex.take_over` found: the last batch applied for the pod
    (``seq`` and its ``digest``; ``None``: none, replay all), or ``fenced_by``: a newer
    epoch fences the pod (the lease counter's Redis lost its count)."""

    seq: int | None = None
    digest: int | None = None
    fenced_by: int | None = None


class RedisPrefixIndex:
    """:class:`edgellm.kvindex.api.BatchPrefixIndex` shared through Redis/Valkey.

    ``url`` (or ``config.redis_url``) names the server - any node of a Redis Cluster, which
    is recognised (``INFO cluster``) and then placed by ``config.redis_placement``;
    ``namespace`` separates indexes that share one server. ``clock`` is wall time by
    default: replicas compare access times.
    """

    def __init__(self, config: IndexConfig | None = None, *, url: str | None = None,
                 namespace: str = "edgellm:kvi", client: redis.Redis | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = c = config if config is not None else IndexConfig()
        url = url or c.redis_url
        if client is None and not url:
            raise ValueError("RedisPrefixIndex needs a url (or config.redis_url) or a client")
        if client is None:
            client = redis.Redis.from_url(url)
            if _is_cluster(client):
                client.close()
                client = redis.RedisCluster.from_url(url)
        self._redis = client
        cluster = isinstance(client, redis.RedisCluster)
        self.placement = Placement(namespace, cluster=cluster, placement=c.redis_placement,
                                   pod_groups=c.redis_pod_groups)
        self._ns = namespace
        self._clock = clock
        self._seed = c.seed
        self._next_sweep = clock() + c.eviction_interval_s
        share = self.placement.share
        max_contexts = c.max_contexts if not cluster else 1 << 40  # see redis_keys.py
        self._limits = [str(v) for v in (
            max_contexts, share(c.max_prefixes_per_context),
            low_watermark(share(c.max_prefixes_per_context)), share(c.max_blocks),
            low_watermark(share(c.max_blocks)))]
        self._cids: dict[ContextKey, str] = {}
        self._block_sizes: dict[str, int] = {}  # context id -> block size (MATCH checks it)
        self._registered: set[str] = set()  # cluster: shards this client put in the registry
        self._tails = Tails()
        self._marks: dict[tuple[str, str], str] = {}  # (shard, pod) -> mark committed last
        self._inflight: Group | None = None
        self._runner = ScriptRunner(client, self.placement)
        self._hasher = PromptHasher(c.seed)
        self._ready_cache: dict[tuple, tuple[list[str], bytes]] = {}
        self._closed = False

    @property
    def match_cache_chunks(self) -> int:
        """64-block chunks of prompts whose hash chain lookups remember (0: none); may be
        changed at any time (as ``MemoryPrefixIndex.match_cache_chunks``)."""
        return self._hasher.chunks

    @match_cache_chunks.setter
    def match_cache_chunks(self, value: int) -> None:
        self._hasher.chunks = value

    # --- PrefixIndex -------------------------------------------------------------------

    def is_ready(self) -> bool:
        if self._closed:
            return False
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    def process_block_stored(self, context: ContextKey, pod_key: str,
                             block_hashes: Sequence[int], parent_block_hash: int | None,
                             token_ids: Sequence[int],
                             block_size: int | None = None) -> StoreResult:
        """One round trip in the common case (the parent is a chain tail this client
        stored, or none); two when the parent's prefix hash must be fetched first."""
        hashes, _, _ = check_event(context, pod_key, block_hashes, parent_block_hash,
                                   token_ids, block_size, self.config.block_size)
        if not hashes:
            return StoreResult(0)  # (as in memory: not even the idle sweep runs)
        return self._apply_one(context, pod_key, (STORED, block_hashes, parent_block_hash,
                                                  token_ids, block_size))

    def process_block_removed(self, context: ContextKey | None, pod_key: str,
                              block_hashes: Sequence[int]) -> int:
        if context is not None:
            check_context(context)
        check_pod(pod_key)
        check_hashes(block_hashes)
        return self._each_shard(context, pod_key, (REMOVED, block_hashes))

    def clear_pod(self, pod_key: str, context: ContextKey | None = None) -> int:
        check_pod(pod_key)
        if context is not None:
            check_context(context)
        return self._each_shard(context, pod_key, (CLEARED,))

    def remove_pod(self, pod_key: str) -> int:
        return self.clear_pod(pod_key)

    def match_prefix(self, context: ContextKey, token_ids: Sequence[int],
                     ready_pods: Iterable[str] | None = None) -> dict[str, PodMatch]:
        """One round trip (``redis_read.match``); any thread."""
        return match(self, context, token_ids, ready_pods)

    def stats(self) -> dict[str, object]:
        return stats(self)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._runner.close()
            self._redis.close()

    def __enter__(self) -> "RedisPrefixIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- batches and leases ------------------------------------------------------------

    def apply_batches(self, batches: Sequence[IndexBatch]) -> list[list[object] | str]:
        """See ``api.BatchPrefixIndex``: one pipeline for the group (``redis_ingest.py``)."""
        return self.finish_batches(self.submit_batches(batches))

    def submit_batches(self, batches: Sequence[IndexBatch]) -> Group:
        """The first half of :meth:`apply_batches`: encode and send, without waiting for
        Redis. At most one group is in flight: submitting another first reads the replies
        of the previous one (kept for its :meth:`finish_batches`), so a writer that
        submits group k+1 before finishing group k keeps Redis busy while it encodes."""
        now = self._maybe_sweep()
        group = send_group(self, batches, now)
        if self._inflight is not None and self._inflight is not group:
            self._complete_inflight()
        self._inflight = group
        return group

    def finish_batches(self, group: Group) -> list[list[object] | str]:
        """The results of a submitted group (see :meth:`apply_batches`)."""
        if self._inflight is group:
            self._inflight = None
        return finish_group(self, group)

    def take_over(self, context: ContextKey, pod_key: str, epoch: int) -> TakeOver:
        """A new writer of ``pod_key`` (lease ``epoch``) fences out older ones in the pod's
        shard and learns where to resume (see :class:`TakeOver`)."""
        shard = self._shard(check_context(context), check_pod(pod_key))
        self._tails.forget(shard, pod_key)
        status, mark = self._eval("TAKEOVER", shard, [pod_key, str(epoch)])
        if status == b"fenced":
            return TakeOver(fenced_by=int(mark))
        if mark is None:
            self._marks.pop((shard, pod_key), None)
            return TakeOver()
        self._marks[(shard, pod_key)] = mark.decode()
        seq, digest = mark.split(b",")
        return TakeOver(seq=int(seq), digest=int(digest))

    def forget_pod(self, pod_key: str) -> None:
        """This client no longer writes ``pod_key`` (another replica does): drop what it
        remembered of it (chain tails, the mark it committed last)."""
        for key in [k for k in self._marks if k[1] == pod_key]:
            del self._marks[key]
            self._tails.forget(*key)

    def behind(self) -> list[str]:
        """Pods whose committed mark is no longer the one this client committed last: the
        index lost their writes (a restart, a failover to a lagging replica). One round
        trip; a writer checks this now and then, so an idle pod is rebuilt too. A pod stays
        in the answer until it is cleared (its resync)."""
        keys = list(self._marks)
        if not keys:
            return []
        self._complete_inflight()
        pipe = self._redis.pipeline(transaction=False)
        for shard, pod in keys:
            pipe.hget(f"{shard}:q", pod)
        out = []
        for (shard, pod), mark in zip(keys, pipe.execute()):
            want = self._marks.get((shard, pod))
            if want is not None and (mark is None or mark.decode() != want):
                out.append(pod)
        return out

    def committed(self, context: ContextKey, pod_key: str) -> tuple[int, int] | None:
        """``(seq, digest)`` committed with ``pod_key``'s last batch applied, if any."""
        shard = self._shard(check_context(context), check_pod(pod_key))
        mark = self._redis.hget(f"{shard}:q", pod_key)
        if mark is None:
            return None
        seq, digest = mark.split(b",")
        return int(seq), int(digest)

    # --- plumbing ------------------------------------------------------------------------

    def _apply_one(self, context: ContextKey, pod_key: str, event: tuple) -> object:
        # A clear never runs the idle sweep (as in memory); anything else may.
        now = self._clock() if event[0] == CLEARED else self._maybe_sweep()
        self._complete_inflight()  # (after the pod's batches in flight)
        group = send_group(self, [IndexBatch(context, pod_key, [event])], now, wait=True)
        (result,) = finish_group(self, group)
        value = result[0]
        if isinstance(value, Exception):
            raise value
        return value

    def _each_shard(self, context: ContextKey | None, pod_key: str, event: tuple) -> int:
        """A removal or clear in ``context``, or in every shard holding the pod."""
        if context is not None:
            return self._apply_one(context, pod_key, event)  # type: ignore[return-value]
        now = self._clock() if event[0] == CLEARED else self._maybe_sweep()
        shards = self._pod_shards(pod_key)
        if not shards:
            return 0
        calls = []
        for shard in shards:
            if event[0] == CLEARED:
                self._tails.forget(shard, pod_key)
                self._marks.pop((shard, pod_key), None)
            op = b"C" if event[0] == CLEARED else b"R" + pack_u64(check_hashes(event[1]))
            calls.append(("BATCH", shard, self._batch_args(shard, pod_key, "[]", now,
                                                           None, None, False, [op])))
        self._complete_inflight()  # (after the pod's batches in flight)
        return sum(int(r[1]) for r in self._runner.run(calls) if r[0] == b"ok")

    def _shard(self, context: ContextKey, pod_key: str) -> str:
        return self.placement.shard(self._cid(context), pod_key)

    def _cid(self, context: ContextKey) -> str:
        cid = self._cids.get(context)
        if cid is None:
            if len(self._cids) >= 4096:
                self._cids.clear()
            cid = self._cids[context] = context_id(context)
        return cid

    def _batch_args(self, shard: str, pod_key: str, ctx_json: str, now: float,
                    epoch: int | None, commit: str | None, resume: bool,
                    ops: list[bytes], expect: str | None = None) -> list:
        return [pod_key, ctx_json, repr(now), *self._limits,
                "" if epoch is None else str(epoch), commit or "",
                "1" if resume else "0", expect or "", *ops]

    def _complete_inflight(self) -> None:
        """Read the replies of the group in flight (they wait in it for its finish)."""
        group, self._inflight = self._inflight, None
        if group is not None:
            try:
                finish_group(self, group)
            except Exception as exc:  # raised again by the group's own finish
                group.error = exc

    def _send(self, calls: list[tuple], wait: bool) -> object:
        """BATCH calls ``(shard, batch, ops, now, mark to commit, mark expected, resume)``
        as one pipeline, read at once if ``wait`` (see ``ScriptRunner.send``)."""
        scripts = self._batch_calls(calls)
        return self._runner.run(scripts) if wait else self._runner.send(scripts)

    def _receive(self, sent: object) -> list:
        return self._runner.receive(sent)

    def _batch_calls(self, calls: list[tuple]) -> list:
        """``(shard, batch, ops, now, mark to commit, mark expected, resume)`` -> scripts."""
        out = []
        for shard, batch, ops, now, commit, expect, resume in calls:
            args = self._batch_args(shard, batch.pod_key,
                                    json.dumps([batch.context[0], batch.context[1]]), now,
                                    batch.epoch, commit, resume, ops, expect)
            out.append(("BATCH", shard, args))
        if self.placement.cluster:
            self._register({c[0] for c in calls}, calls)
        return out

    def _run_parents(self, asks: list[tuple[str, str, bytes]]) -> list:
        return self._runner.run([("PARENTS", shard, [pod, blob]) for shard, pod, blob in asks])

    def _eval(self, name: str, shard: str, args: list) -> object:
        return self._runner.run([(name, shard, args)])[0]

    def _pod_shards(self, pod_key: str) -> list[str]:
        if not self.placement.cluster:
            return sorted(m.decode() for m in self._redis.smembers(f"{self._ns}:pc:{pod_key}"))
        return self._all_shards()  # (a cluster keeps no per-pod set across slots)

    def _all_shards(self) -> list[str]:
        if self.placement.cluster:
            return sorted(k.decode() for k in self._redis.hkeys(self.placement.registry))
        return [m.decode() for m in self._redis.zrange(f"{self._ns}:lru", 0, -1)]

    def _register(self, shards: set[str], calls: list[tuple]) -> None:
        new = shards - self._registered
        if new:
            ctx = {shard: json.dumps(list(batch.context)) for shard, batch, *_ in calls}
            self._redis.hset(self.placement.registry, mapping={s: ctx[s] for s in new})
            self._registered |= new

    def _maybe_sweep(self) -> float:
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + self.config.eviction_interval_s
            limit = now - self.config.idle_eviction_s
            if self.placement.cluster:
                shards = self._all_shards()
                dropped = self._runner.run([("IDLE", s, [repr(limit)]) for s in shards])
                for s, gone in zip(shards, dropped):
                    if gone:
                        log.info("dropped idle shard %s", s)
            else:
                for shard in self._redis.zrangebyscore(f"{self._ns}:lru", "-inf", limit):
                    log.info("dropping context %s: idle", shard.decode())
                    self._eval("DROP_CONTEXT", shard.decode(), [])
        return now


def _is_cluster(client: redis.Redis) -> bool:
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError:
        return False
