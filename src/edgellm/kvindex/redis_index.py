"""The prefix index in Redis/Valkey, so several router replicas share one index.

Same semantics and answers as :class:`edgellm.kvindex.memory.MemoryPrefixIndex` for the same
calls (a property test drives both against one reference model): same hash chain
(computed here, in the client), same argument checks (``validate.py``), same rules for
events that are not indexed, same limits and eviction order (``memory_lru.py``). Every
change is one Lua script (``redis_scripts.py``, which lists the keys), so each is atomic
against other replicas; replicas that apply the same events twice are harmless (storing
what is held refreshes it, removing what is gone is a no-op). Eviction runs inside the
store script: a store over the budget costs no extra round trip.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterable, Sequence

import redis
from xxhash import xxh64_intdigest

from edgellm.kvindex import redis_scripts
from edgellm.kvindex.api import ContextKey, PodMatch, StoreResult
from edgellm.kvindex.config import IndexConfig, low_watermark
from edgellm.kvindex.hashing import block_bytes, chain_packer
from edgellm.kvindex.validate import (
    check_context,
    check_event,
    check_hashes,
    check_pod,
    check_ready,
    context_id,
    prompt_bytes,
)

__all__ = ["RedisPrefixIndex"]

_TAILS = 65536  # chain tails remembered per client (then forgotten at once)

log = logging.getLogger(__name__)


class RedisPrefixIndex:
    """:class:`edgellm.kvindex.api.PrefixIndex` shared through Redis/Valkey.

    ``url`` (or ``config.redis_url``) names the server; ``namespace`` separates indexes that
    share one server. ``clock`` is wall time by default: replicas compare access times.
    """

    def __init__(self, config: IndexConfig | None = None, *, url: str | None = None,
                 namespace: str = "edgellm:kvi", client: redis.Redis | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config if config is not None else IndexConfig()
        url = url or self.config.redis_url
        if client is None and not url:
            raise ValueError("RedisPrefixIndex needs a url (or config.redis_url) or a client")
        self._redis = client if client is not None else redis.Redis.from_url(url)
        self._ns = namespace
        self._clock = clock
        self._seed = self.config.seed
        self._next_sweep = clock() + self.config.eviction_interval_s
        c = self.config
        self._limits = [c.max_contexts, c.max_prefixes_per_context,
                        low_watermark(c.max_prefixes_per_context), c.max_blocks,
                        low_watermark(c.max_blocks)]
        self._cids: dict[ContextKey, str] = {}
        self._tails: dict[tuple[str, str, int], int] = {}  # chain tails this client stored
        r = self._redis
        self._parent = r.register_script(redis_scripts.PARENT)
        self._store = r.register_script(redis_scripts.STORE)
        self._remove = r.register_script(redis_scripts.REMOVE)
        self._clear = r.register_script(redis_scripts.CLEAR)
        self._drop_context = r.register_script(redis_scripts.DROP_CONTEXT)
        self._match = r.register_script(redis_scripts.MATCH)
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
        """One round trip in the common case: the parent is the tail of a chain this client
        stored (decode steps, the next turn of a chat), remembered here and checked by the
        script; otherwise the parent's prefix hash is fetched first."""
        block_hashes, parent, block_size = check_event(
            context, pod_key, block_hashes, parent_block_hash, token_ids, block_size,
            self.config.block_size)
        n = len(block_hashes)
        if not n:
            return StoreResult(0)
        now = self._maybe_sweep()
        cid = self._cid(context)
        ns = self._ns
        parent_h = None if parent is None else self._tails.pop((cid, pod_key, parent), None)
        remembered = parent_h is not None
        if parent is not None and parent_h is None:
            found = self._parent(args=[ns, cid, pod_key, str(parent)])
            if found is None:
                return self._rejected(context, cid, pod_key, block_size, n, unknown_parent=True)
            parent_h = int(found)
        n_blocks = min(n, len(token_ids) // block_size)
        try:
            blocks = block_bytes(token_ids, block_size, n_blocks) if n_blocks else ()
        except (ValueError, TypeError):
            blocks = None
        if not blocks:
            # Not indexed, but an unknown parent is what counts first: a remembered tail is
            # only a guess (the script checks it when storing), so ask the server.
            if remembered and self._parent(args=[ns, cid, pod_key, str(parent)]) is None:
                return self._rejected(context, cid, pod_key, block_size, n, unknown_parent=True)
            return self._rejected(context, cid, pod_key, block_size, n,
                                  invalid_tokens=blocks is None)
        args: list[object] = [
            ns, cid, pod_key, json.dumps([context[0], context[1]]), now, block_size,
            *self._limits, "" if parent is None else str(parent),
            "" if parent_h is None else str(parent_h)]
        pack = chain_packer(block_size)
        seed = self._seed
        h = seed if parent_h is None else parent_h
        for engine_hash, data in zip(block_hashes, blocks):
            h = xxh64_intdigest(pack(h, data), seed)
            args.append(str(engine_hash))
            args.append(str(h))
        (stored,) = self._store(args=args)
        if stored == -1 and remembered:  # the remembered parent went away: ask the server
            return self.process_block_stored(context, pod_key, block_hashes, parent,
                                             token_ids, block_size)
        if stored < 0:
            return self._rejected(context, cid, pod_key, block_size, n,
                                  unknown_parent=stored == -1)
        if len(self._tails) >= _TAILS:
            self._tails.clear()
        self._tails[(cid, pod_key, block_hashes[n_blocks - 1])] = h
        if stored == n:
            return StoreResult(stored)
        return StoreResult(stored, skipped=n - stored)

    def _rejected(self, context: ContextKey, cid: str, pod_key: str, block_size: int,
                  n: int, *, unknown_parent: bool = False,
                  invalid_tokens: bool = False) -> StoreResult:
        """Count why an event was not indexed (a block size mismatch first, as the memory
        backend does) and say so."""
        known = self._block_size(cid)
        if known is not None and known != block_size:
            self._count("block_size_mismatch")
            log.warning("context %s has block size %d; blocks from %s have %d: not indexed",
                        context, known, pod_key, block_size)
            return StoreResult(0, skipped=n)
        if unknown_parent:
            self._count("unknown_parent")
            return StoreResult(0, unknown_parent=True, skipped=n)
        if invalid_tokens:
            self._count("invalid_tokens")
        return StoreResult(0, skipped=n)

    def process_block_removed(self, context: ContextKey | None, pod_key: str,
                              block_hashes: Sequence[int]) -> int:
        if context is not None:
            check_context(context)
        check_pod(pod_key)
        hashes = [str(e) for e in check_hashes(block_hashes)]
        now = self._maybe_sweep()
        cids = self._pod_cids(pod_key) if context is None else [self._cid(context)]
        return sum(int(self._remove(args=[self._ns, cid, pod_key, now, *hashes])) for cid in cids)

    def clear_pod(self, pod_key: str, context: ContextKey | None = None) -> int:
        check_pod(pod_key)
        if context is not None:
            check_context(context)
        cids = self._pod_cids(pod_key) if context is None else [self._cid(context)]
        return sum(int(self._clear(args=[self._ns, cid, pod_key])) for cid in cids)

    def remove_pod(self, pod_key: str) -> int:
        return self.clear_pod(pod_key)

    def match_prefix(self, context: ContextKey, token_ids: Sequence[int],
                     ready_pods: Iterable[str] | None = None) -> dict[str, PodMatch]:
        check_context(context)
        data = prompt_bytes(token_ids)
        ready = check_ready(ready_pods)
        cid = self._cid(context)
        block_size = self._block_size(cid)
        if block_size is None:
            return {}
        now = self._clock()
        n_blocks = len(data) // (4 * block_size)
        if ready is None:
            ready = tuple(p.decode() for p in self._redis.hkeys(f"{self._ns}:s:{cid}"))
        if not ready or not n_blocks:
            # Nothing to walk; the context was still used (its idle clock, as in memory).
            self._redis.zadd(f"{self._ns}:lru", {cid: now}, xx=True)
            return {}
        pack = chain_packer(block_size)
        seed = self._seed
        width = 4 * block_size
        h = seed
        hashes = []
        for i in range(0, n_blocks * width, width):
            h = xxh64_intdigest(pack(h, data[i:i + width]), seed)
            hashes.append(h)
        flat = self._match(args=[self._ns, cid, now, len(ready), *ready, *hashes])
        return {flat[i].decode(): PodMatch(int(flat[i + 1]), 100.0 * int(flat[i + 1]) / n_blocks)
                for i in range(0, len(flat), 2)}

    def stats(self) -> dict[str, object]:
        ns = self._ns
        counts = {k.decode(): int(v) for k, v in self._redis.hgetall(f"{ns}:n").items()}
        cids = [c.decode() for c in self._redis.zrange(f"{ns}:lru", 0, -1)]
        pipe = self._redis.pipeline(transaction=False)
        for cid in cids:
            pipe.hlen(f"{ns}:x:{cid}")
            pipe.hkeys(f"{ns}:s:{cid}")
        replies = pipe.execute() if cids else []
        pods = set()
        for keys in replies[1::2]:
            pods.update(keys)
        return {
            "backend": "redis",
            "contexts": len(cids),
            "pods": len(pods),
            "blocks": counts.get("blocks", 0),
            "prefixes": sum(replies[0::2]),
            **{k: counts.get(k, 0) for k in ("evicted_blocks", "evicted_contexts",
                                             "unknown_parent", "invalid_tokens",
                                             "block_size_mismatch")},
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._redis.close()

    def __enter__(self) -> "RedisPrefixIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers -----------------------------------------------------------------------

    def _cid(self, context: ContextKey) -> str:
        cid = self._cids.get(context)
        if cid is None:
            if len(self._cids) >= 4096:
                self._cids.clear()
            cid = self._cids[context] = context_id(context)
        return cid

    def _pod_cids(self, pod_key: str) -> list[str]:
        return sorted(m.decode() for m in self._redis.smembers(f"{self._ns}:pc:{pod_key}"))

    def _block_size(self, cid: str) -> int | None:
        """The context's block size from Redis (another replica may have created or dropped
        it, so the local cache is only trusted for the id)."""
        raw = self._redis.hget(f"{self._ns}:bs", cid)
        return None if raw is None else int(raw)

    def _count(self, name: str) -> None:
        self._redis.hincrby(f"{self._ns}:n", name, 1)

    def _maybe_sweep(self) -> float:
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + self.config.eviction_interval_s
            idle = self._redis.zrangebyscore(f"{self._ns}:lru", "-inf",
                                             now - self.config.idle_eviction_s)
            for cid in idle:
                log.info("dropping context %s: idle", cid.decode())
                self._drop_context(args=[self._ns, cid.decode()])
        return now
