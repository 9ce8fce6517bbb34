"""The prefix index in Redis/Valkey (one server or Redis Cluster), shared by replicas.

Same semantics and answers as :class:`edgellm.kvindex.memory.MemoryPrefixIndex` for the same
calls on one Redis (a property test drives both against one reference model): same hash
chain (computed here, in the client, in C), same argument checks (``validate.py``), same
rules for events that are not indexed, same limits and eviction order (``memory_lru.py``).

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
from redis.exceptions import NoScriptError

from edgellm.kvindex import redis_scripts
from edgellm.kvindex._rows import chain_hashes
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
from edgellm.kvindex.validate import (
    check_context,
    check_event,
    check_hashes,
    check_pod,
    check_ready,
    context_id,
    prompt_bytes,
)

__all__ = ["RedisPrefixIndex", "TakeOver"]

log = logging.getLogger(__name__)

_SCRIPTS = ("BATCH", "PARENTS", "MATCH", "DROP_CONTEXT", "IDLE", "TAKEOVER", "STATS")


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
        self._writer = None  # one server: the connection batches are written on
        self._inflight: Group | None = None
        self._sha: dict[str, str] = {}
        self._load_scripts()
        self._closed = False

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
        """One round trip: a MATCH script per shard of the context (one, unless pods are
        spread over a cluster), sent together. A context whose block size this client has
        not seen costs one more, once."""
        check_context(context)
        data = prompt_bytes(token_ids)
        ready = check_ready(ready_pods)
        if ready is not None:
            ready = sorted(set(ready))  # (the script touches in this order)
        cid = self._cid(context)
        shards = self.placement.shards(cid)
        block_size = self._block_sizes.get(cid)
        if block_size is None:
            block_size = self._fetch_block_size(cid, shards)
            if block_size is None:
                return {}
        now = repr(self._clock())
        for _ in range(2):
            n_blocks = len(data) // (4 * block_size)
            blob = chain_hashes(data[: n_blocks * 4 * block_size], block_size, self._seed,
                                self._seed) if n_blocks else []
            packed = pack_u64(blob)
            calls = []
            for shard in shards:
                if ready is None:
                    calls.append(("MATCH", shard, [now, str(block_size), "-1", packed]))
                    continue
                pods = [p for p in ready if len(shards) == 1
                        or self.placement.shard(cid, p) == shard]
                if pods:
                    calls.append(("MATCH", shard, [now, str(block_size), str(len(pods)), *pods,
                                                   packed]))
            if not calls:  # (no ready pod: the context's clock is still touched)
                calls = [("MATCH", shards[0], [now, str(block_size), "0", packed])]
            replies = self._pipeline(calls)
            if any(r and r[0] == b"bs" for r in replies):  # dropped and made again meanwhile
                sizes = [int(r[1]) for r in replies if r and r[0] == b"bs"]
                block_size = self._block_sizes[cid] = sizes[0]
                continue
            out: dict[str, PodMatch] = {}
            for flat in replies:
                for i in range(0, len(flat), 2):
                    n = int(flat[i + 1])
                    out[flat[i].decode()] = PodMatch(n, 100.0 * n / n_blocks)
            return out if len(shards) == 1 else dict(sorted(out.items()))
        return {}

    def stats(self) -> dict[str, object]:
        shards = self._all_shards()
        replies = self._pipeline([("STATS", s, []) for s in shards]) if shards else []
        pods: set[bytes] = set()
        for reply in replies:
            pods.update(reply[1:])
        counts: dict[str, int] = {}
        for scope in ({self.placement.scope(s) for s in shards} if self.placement.cluster
                      else {self._ns}):
            for k, v in self._redis.hgetall(f"{scope}:n").items():
                counts[k.decode()] = counts.get(k.decode(), 0) + int(v)
        return {
            "backend": "redis",
            "placement": self.placement.placement if self.placement.cluster else "standalone",
            "contexts": (len(self._contexts_in(shards)) if self.placement.cluster
                         else len(shards)),
            "pods": len(pods),
            "blocks": counts.get("blocks", 0),
            "prefixes": sum(int(r[0]) for r in replies),
            **{k: counts.get(k, 0) for k in ("evicted_blocks", "evicted_contexts",
                                             "unknown_parent", "invalid_tokens",
                                             "block_size_mismatch")},
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._writer is not None:
                self._redis.connection_pool.release(self._writer)
                self._writer = None
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
        return sum(int(r[1]) for r in self._pipeline(calls) if r[0] == b"ok")

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
        """BATCH calls ``(shard, batch, ops, now, commit_seq, resume)`` as one pipeline,
        written without reading the replies (:meth:`_receive`) on one server unless
        ``wait``; on a cluster, sent and read at once (the replies are what is returned)."""
        scripts = self._batch_calls(calls)
        if wait or self.placement.cluster:
            return self._pipeline(scripts)
        if self._writer is None:
            self._writer = self._redis.connection_pool.get_connection()
        conn = self._writer
        try:
            conn.send_packed_command(conn.pack_commands(
                [self._command(name, shard, args) for name, shard, args in scripts]))
        except Exception:
            self._drop_writer()
            raise
        return (conn, scripts)

    def _receive(self, sent: object) -> list:
        if isinstance(sent, list):
            return sent
        conn, scripts = sent
        replies = []
        try:
            for _ in scripts:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except Exception:
            self._drop_writer()
            raise
        first = next((i for i, r in enumerate(replies) if isinstance(r, NoScriptError)), None)
        if first is not None:  # a restart or failover lost the scripts: from there on, again
            self._load_scripts()
            replies[first:] = self._pipeline(scripts[first:])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _drop_writer(self) -> None:
        if self._writer is not None:
            self._writer.disconnect()
            self._redis.connection_pool.release(self._writer)
            self._writer = None

    def _command(self, name: str, shard: str, args: list) -> tuple:
        return ("EVALSHA", self._sha[name], 1, f"{shard}:m", self.placement.scope(shard),
                shard, *args)

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
        return self._pipeline([("PARENTS", shard, [pod, blob]) for shard, pod, blob in asks])

    def _eval(self, name: str, shard: str, args: list) -> object:
        return self._pipeline([(name, shard, args)])[0]

    def _pipeline(self, calls: list[tuple[str, str, list]]) -> list:
        """Run scripts ``(name, shard, args)`` in one pipeline, in order; loads the scripts
        again if the server lost them (a restart, a failover) and resends from the first
        that was refused for it (the ones after it were refused too)."""
        self._complete_inflight()  # (scripts run in the order they were sent)
        if len(calls) == 1:  # (a pipeline object costs ~20 us more than a plain command)
            name, shard, args = calls[0]
            command = self._command(name, shard, args)
            try:
                return [self._redis.execute_command(*command)]
            except NoScriptError:
                self._load_scripts()
                return [self._redis.execute_command("EVALSHA", self._sha[name], *command[2:])]
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for name, shard, args in calls:
                pipe.execute_command(*self._command(name, shard, args))
            replies = pipe.execute(raise_on_error=False)
            first = next((i for i, r in enumerate(replies) if isinstance(r, NoScriptError)),
                         None)
            if first is None:
                break
            if attempt:
                raise replies[first]
            self._load_scripts()
            replies[first:] = self._pipeline(calls[first:])
            break
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _load_scripts(self) -> None:
        """(Again, after a restart or failover lost them.) On a cluster, every master."""
        self._sha = {name: self._redis.script_load(getattr(redis_scripts, name))
                     for name in _SCRIPTS}

    def _fetch_block_size(self, cid: str, shards: list[str]) -> int | None:
        """The context's block size, from the first of its shards that has one."""
        pipe = self._redis.pipeline(transaction=False)
        for shard in shards:
            pipe.hget(f"{self.placement.scope(shard)}:bs", shard)
        for raw in pipe.execute():
            if raw is not None:
                if len(self._block_sizes) >= 4096:
                    self._block_sizes.clear()
                self._block_sizes[cid] = int(raw)
                return int(raw)
        return None

    def _pod_shards(self, pod_key: str) -> list[str]:
        if not self.placement.cluster:
            return sorted(m.decode() for m in self._redis.smembers(f"{self._ns}:pc:{pod_key}"))
        return self._all_shards()  # (a cluster keeps no per-pod set across slots)

    def _all_shards(self) -> list[str]:
        if self.placement.cluster:
            return sorted(k.decode() for k in self._redis.hkeys(self.placement.registry))
        return [m.decode() for m in self._redis.zrange(f"{self._ns}:lru", 0, -1)]

    def _contexts_in(self, shards: list[str]) -> set[str]:
        """Cluster: the contexts of these shards that still exist (a block size set)."""
        pipe = self._redis.pipeline(transaction=False)
        for s in shards:
            pipe.hexists(f"{s}:bs", s)
        alive = [s for s, ok in zip(shards, pipe.execute()) if ok]
        return {s.split("{", 1)[1].split(":")[0].rstrip("}") for s in alive}

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
                dropped = self._pipeline([("IDLE", s, [repr(limit)]) for s in shards])
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
