"""The prefix index in Redis/Valkey, so several router replicas share one index.

Same semantics and answers as :class:`edgellm.kvindex.memory.MemoryPrefixIndex` for the same
calls (a property test drives both): same hash chain (computed here, in the client), same
unknown-parent rule, same limits and eviction order (largest pod-context first, its least
recently stored blocks). Every change is one Lua script, so each is atomic against other
replicas; replicas that apply the same events twice are harmless (storing what is held and
removing what is gone are no-ops).

Keys (``ns`` = namespace, ``cid`` = xxh64 of the context, ``slot`` = a pod's number in a
context, never reused):

=============================  ======  ===================================================
``ns:ctx`` / ``ns:bs``            hash    cid -> JSON ``[model, lora]`` / its block size
``ns:lru``                      zset    cid by last access time (idle / max-contexts eviction)
``ns:x:{cid}``                  hash    prefix hash -> ``",3,17,"`` (slots holding it)
``ns:s:{cid}`` / ``ns:r:{cid}``  hash    pod -> slot / slot -> pod
``ns:e:{cid}:{slot}``           hash    engine hash -> prefix hash (the pod's own map)
``ns:o:{cid}:{slot}``           zset    engine hash by store sequence (recency)
``ns:pc:{pod}``                 set     the pod's contexts (clear / remove in its own time)
``ns:sizes``                    zset    ``cid:slot`` by holdings (eviction victim)
``ns:n``                        hash    counters: blocks, seq, slot ids, evictions...
=============================  ======  ===================================================

Hashes travel as decimal strings (Lua numbers are doubles). Keys are built inside scripts,
so this needs one Redis (or a replicated primary), not Redis Cluster.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterable, Sequence

import redis
from xxhash import xxh64_hexdigest, xxh64_intdigest

from edgellm.kvindex.api import ContextKey, PodMatch, StoreResult
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.hashing import block_bytes, chain_packer, engine_key, engine_keys

__all__ = ["RedisPrefixIndex"]

_TAILS = 65536  # chain tails remembered per client (then forgotten at once)

log = logging.getLogger(__name__)

_LUA_COMMON = """
local ns = ARGV[1]
local function release(cid, h, slot)
  local xk = ns .. ':x:' .. cid
  local v = redis.call('HGET', xk, h)
  if not v then return end
  local tag = ',' .. slot .. ','
  local s, e = string.find(v, tag, 1, true)
  if not s then return end
  v = string.sub(v, 1, s) .. string.sub(v, e + 1)
  if v == ',' then redis.call('HDEL', xk, h) else redis.call('HSET', xk, h, v) end
end
local function drop_holdings(cid, pod)
  local slot = redis.call('HGET', ns .. ':s:' .. cid, pod)
  if not slot then return 0 end
  local ek = ns .. ':e:' .. cid .. ':' .. slot
  local flat = redis.call('HGETALL', ek)
  for i = 1, #flat, 2 do release(cid, flat[i + 1], slot) end
  local n = #flat / 2
  redis.call('DEL', ek, ns .. ':o:' .. cid .. ':' .. slot)
  redis.call('HDEL', ns .. ':s:' .. cid, pod)
  redis.call('HDEL', ns .. ':r:' .. cid, slot)
  redis.call('ZREM', ns .. ':sizes', cid .. ':' .. slot)
  redis.call('SREM', ns .. ':pc:' .. pod, cid)
  redis.call('HINCRBY', ns .. ':n', 'blocks', 0 - n)
  return n
end
"""

# ARGV: ns, cid, pod, parent_engine_hash
_PARENT = """
local ns = ARGV[1]
local slot = redis.call('HGET', ns .. ':s:' .. ARGV[2], ARGV[3])
if not slot then return false end
local h = redis.call('HGET', ns .. ':e:' .. ARGV[2] .. ':' .. slot, ARGV[4])
if not h then return false end
local v = redis.call('HGET', ns .. ':x:' .. ARGV[2], h)
if not v or not string.find(v, ',' .. slot .. ',', 1, true) then return false end
return h
"""

# ARGV: ns, cid, pod, ctx_json, now, n, block_size, parent_e, parent_h, e1, h1, e2, h2, ...
# parent_e/parent_h: the parent's engine hash and the prefix hash the client chained on
# ("" for a root chain); checked here, since another replica may have removed it.
# Returns {stored, blocks_total, prefixes_in_context, context_created}; stored is -1 if the
# parent is not held (or not as the client thought), -2 if the block size differs.
_STORE = _LUA_COMMON + """
local cid, pod, n = ARGV[2], ARGV[3], tonumber(ARGV[6])
local known_bs = redis.call('HGET', ns .. ':bs', cid)
if known_bs and known_bs ~= ARGV[7] then return {-2, 0, 0, 0} end
if ARGV[8] ~= '' then
  local held = false
  local pslot = redis.call('HGET', ns .. ':s:' .. cid, pod)
  if pslot then
    local ph = redis.call('HGET', ns .. ':e:' .. cid .. ':' .. pslot, ARGV[8])
    if ph == ARGV[9] then
      local v = redis.call('HGET', ns .. ':x:' .. cid, ph)
      held = v and string.find(v, ',' .. pslot .. ',', 1, true) ~= nil
    end
  end
  if not held then return {-1, 0, 0, 0} end
end
local created = 0
if not known_bs then
  redis.call('HSET', ns .. ':bs', cid, ARGV[7])
  redis.call('HSET', ns .. ':ctx', cid, ARGV[4])
  created = 1
end
redis.call('ZADD', ns .. ':lru', ARGV[5], cid)
local sk = ns .. ':s:' .. cid
local slot = redis.call('HGET', sk, pod)
if not slot then
  slot = tostring(redis.call('HINCRBY', ns .. ':n', 'slot:' .. cid, 1) - 1)
  redis.call('HSET', sk, pod, slot)
  redis.call('HSET', ns .. ':r:' .. cid, slot, pod)
  redis.call('SADD', ns .. ':pc:' .. pod, cid)
end
local ek = ns .. ':e:' .. cid .. ':' .. slot
local ok = ns .. ':o:' .. cid .. ':' .. slot
local xk = ns .. ':x:' .. cid
local tag = ',' .. slot .. ','
local base = redis.call('HINCRBY', ns .. ':n', 'seq', n) - n
local before = redis.call('HLEN', ek)
for i = 1, n do
  local e, h = ARGV[8 + 2 * i], ARGV[9 + 2 * i]
  local old = redis.call('HGET', ek, e)
  if old and old ~= h then release(cid, old, slot) end
  redis.call('HSET', ek, e, h)
  redis.call('ZADD', ok, base + i, e)
  local v = redis.call('HGET', xk, h)
  if not v then
    redis.call('HSET', xk, h, tag)
  elseif not string.find(v, tag, 1, true) then
    redis.call('HSET', xk, h, v .. slot .. ',')
  end
end
local added = redis.call('HLEN', ek) - before
redis.call('ZINCRBY', ns .. ':sizes', added, cid .. ':' .. slot)
local total = redis.call('HINCRBY', ns .. ':n', 'blocks', added)
return {n, total, redis.call('HLEN', xk), created}
"""

# ARGV: ns, cid, pod, now, e1, e2, ...   Returns removed count.
_REMOVE = _LUA_COMMON + """
local cid, pod = ARGV[2], ARGV[3]
local slot = redis.call('HGET', ns .. ':s:' .. cid, pod)
if not slot then return 0 end
redis.call('ZADD', ns .. ':lru', ARGV[4], cid)
local ek = ns .. ':e:' .. cid .. ':' .. slot
local ok = ns .. ':o:' .. cid .. ':' .. slot
local removed = 0
for i = 5, #ARGV do
  local h = redis.call('HGET', ek, ARGV[i])
  if h then
    redis.call('HDEL', ek, ARGV[i])
    redis.call('ZREM', ok, ARGV[i])
    release(cid, h, slot)
    removed = removed + 1
  end
end
redis.call('ZINCRBY', ns .. ':sizes', 0 - removed, cid .. ':' .. slot)
redis.call('HINCRBY', ns .. ':n', 'blocks', 0 - removed)
return removed
"""

# ARGV: ns, cid, pod, count   Evicts the pod's `count` least recently stored blocks.
_EVICT = _LUA_COMMON + """
local cid, pod, count = ARGV[2], ARGV[3], tonumber(ARGV[4])
local slot = redis.call('HGET', ns .. ':s:' .. cid, pod)
if not slot then return 0 end
local ek = ns .. ':e:' .. cid .. ':' .. slot
local ok = ns .. ':o:' .. cid .. ':' .. slot
local victims = redis.call('ZRANGE', ok, 0, count - 1)
for _, e in ipairs(victims) do
  release(cid, redis.call('HGET', ek, e), slot)
  redis.call('HDEL', ek, e)
  redis.call('ZREM', ok, e)
end
redis.call('HINCRBY', ns .. ':n', 'blocks', 0 - #victims)
redis.call('HINCRBY', ns .. ':n', 'evicted_blocks', #victims)
if redis.call('HLEN', ek) == 0 then
  drop_holdings(cid, pod)
else
  redis.call('ZINCRBY', ns .. ':sizes', 0 - #victims, cid .. ':' .. slot)
end
return #victims
"""

# ARGV: ns, cid, pod   Returns how many blocks the pod held there.
_CLEAR = _LUA_COMMON + """
return drop_holdings(ARGV[2], ARGV[3])
"""

# ARGV: ns, cid   Drops a whole context.
_DROP_CONTEXT = _LUA_COMMON + """
local cid = ARGV[2]
local flat = redis.call('HGETALL', ns .. ':s:' .. cid)
for i = 1, #flat, 2 do drop_holdings(cid, flat[i]) end
redis.call('DEL', ns .. ':x:' .. cid, ns .. ':s:' .. cid, ns .. ':r:' .. cid)
redis.call('HDEL', ns .. ':n', 'slot:' .. cid)
redis.call('HDEL', ns .. ':ctx', cid)
redis.call('HDEL', ns .. ':bs', cid)
redis.call('ZREM', ns .. ':lru', cid)
redis.call('HINCRBY', ns .. ':n', 'evicted_contexts', 1)
return 1
"""

# ARGV: ns, cid, now, n_ready, pod1..podN, h1, h2, ...
# Returns a flat {pod, matched_blocks, ...}.
_MATCH = """
local ns, cid = ARGV[1], ARGV[2]
if redis.call('ZSCORE', ns .. ':lru', cid) == false then return {} end
redis.call('ZADD', ns .. ':lru', ARGV[3], cid)
local n_ready = tonumber(ARGV[4])
local alive, n_alive = {}, 0
if n_ready > 0 then
  local slots = redis.call('HMGET', ns .. ':s:' .. cid, unpack(ARGV, 5, 4 + n_ready))
  for i = 1, n_ready do
    if slots[i] and not alive[slots[i]] then alive[slots[i]] = ARGV[4 + i]; n_alive = n_alive + 1 end
  end
end
local out = {}
if n_alive == 0 then return out end
local xk = ns .. ':x:' .. cid
local first = 5 + n_ready
local done, previous = 0, nil
for i = first, #ARGV do
  local v = redis.call('HGET', xk, ARGV[i])
  if not v then break end
  if v ~= previous then
    for slot, pod in pairs(alive) do
      if not string.find(v, ',' .. slot .. ',', 1, true) then
        if done > 0 then out[#out + 1] = pod; out[#out + 1] = done end
        alive[slot] = nil
        n_alive = n_alive - 1
      end
    end
    previous = v
    if n_alive == 0 then return out end
  end
  done = done + 1
end
if done > 0 then
  for slot, pod in pairs(alive) do out[#out + 1] = pod; out[#out + 1] = done end
end
return out
"""


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
        self._cids: dict[ContextKey, str] = {}
        self._tails: dict[tuple[str, str, int], int] = {}  # chain tails this client stored
        r = self._redis
        self._parent = r.register_script(_PARENT)
        self._store = r.register_script(_STORE)
        self._remove = r.register_script(_REMOVE)
        self._evict = r.register_script(_EVICT)
        self._clear = r.register_script(_CLEAR)
        self._drop_context = r.register_script(_DROP_CONTEXT)
        self._match = r.register_script(_MATCH)
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
                             token_ids: Sequence[int], block_size: int) -> StoreResult:
        """One round trip in the common case: the parent is the tail of a chain this client
        stored (decode steps, the next turn of a chat), remembered here and checked by the
        script; otherwise the parent's prefix hash is fetched first."""
        if not block_hashes:
            return StoreResult(0)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        block_hashes = engine_keys(block_hashes)
        if parent_block_hash is not None:
            parent_block_hash = engine_key(parent_block_hash)
        now = self._maybe_sweep()
        cid = self._cid(context)
        ns = self._ns
        tail_key = (cid, pod_key, parent_block_hash)
        parent_h = None if parent_block_hash is None else self._tails.pop(tail_key, None)
        remembered = parent_h is not None
        if parent_block_hash is not None and parent_h is None:
            parent = self._parent(args=[ns, cid, pod_key, str(parent_block_hash)])
            if parent is None:
                return self._rejected(context, cid, pod_key, block_size, len(block_hashes),
                                      unknown_parent=True)
            parent_h = int(parent)
        n_blocks = min(len(block_hashes), len(token_ids) // block_size)
        try:
            blocks = block_bytes(token_ids, block_size, n_blocks)
        except ValueError:
            return self._rejected(context, cid, pod_key, block_size, len(block_hashes),
                                  invalid_tokens=True)
        args: list[object] = [
            ns, cid, pod_key, json.dumps([context[0], context[1]]), now, n_blocks, block_size,
            "" if parent_block_hash is None else str(parent_block_hash),
            "" if parent_h is None else str(parent_h)]
        pack = chain_packer(block_size)
        seed = self._seed
        h = seed if parent_h is None else parent_h
        for engine_hash, data in zip(block_hashes, blocks):
            h = xxh64_intdigest(pack(h, data), seed)
            args.append(str(engine_hash))
            args.append(str(h))
        stored, total, prefixes, created = self._store(args=args)
        if stored == -1 and remembered:  # the remembered parent went away: ask the server
            return self.process_block_stored(context, pod_key, block_hashes, parent_block_hash,
                                             token_ids, block_size)
        if stored < 0:
            return self._rejected(context, cid, pod_key, block_size, len(block_hashes),
                                  unknown_parent=stored == -1)
        if n_blocks:
            if len(self._tails) >= _TAILS:
                self._tails.clear()
            self._tails[(cid, pod_key, block_hashes[n_blocks - 1])] = h
        if created and self._count_contexts() > self.config.max_contexts:
            self._drop_lru_context(keep=cid)
        if total > self.config.max_blocks or prefixes > self.config.max_prefixes_per_context:
            self._enforce_limits(context, cid)
        if stored == len(block_hashes):
            return StoreResult(stored)
        return StoreResult(stored, skipped=len(block_hashes) - stored)

    def _rejected(self, context: ContextKey, cid: str, pod_key: str, block_size: int,
                  n: int, *, unknown_parent: bool = False,
                  invalid_tokens: bool = False) -> StoreResult:
        """Count why an event was not indexed (a block size mismatch first, as the memory
        backend does) and say so."""
        known = self._block_size(context, cid)
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
        now = self._maybe_sweep()
        if context is None:
            cids = sorted(m.decode() for m in self._redis.smembers(f"{self._ns}:pc:{pod_key}"))
        else:
            cids = [self._cid(context)]
        hashes = [str(e) for e in engine_keys(block_hashes)]
        return sum(int(self._remove(args=[self._ns, cid, pod_key, now, *hashes])) for cid in cids)

    def clear_pod(self, pod_key: str, context: ContextKey | None = None) -> int:
        if context is None:
            cids = sorted(m.decode() for m in self._redis.smembers(f"{self._ns}:pc:{pod_key}"))
        else:
            cids = [self._cid(context)]
        return sum(int(self._clear(args=[self._ns, cid, pod_key])) for cid in cids)

    def remove_pod(self, pod_key: str) -> int:
        return self.clear_pod(pod_key)

    def match_prefix(self, context: ContextKey, token_ids: Sequence[int],
                     ready_pods: Iterable[str] | None = None) -> dict[str, PodMatch]:
        cid = self._cid(context)
        block_size = self._block_size(context, cid)
        if block_size is None:
            return {}
        n_blocks = len(token_ids) // block_size
        if ready_pods is None:
            ready = [p.decode() for p in self._redis.hkeys(f"{self._ns}:s:{cid}")]
        else:
            ready = list(ready_pods)
        if not ready or not n_blocks:
            return {}
        hashes = []
        h = self._seed
        pack = chain_packer(block_size)
        try:
            blocks = block_bytes(token_ids, block_size, n_blocks)
        except ValueError:
            return {}
        for data in blocks:
            h = xxh64_intdigest(pack(h, data), self._seed)
            hashes.append(h)
        flat = self._match(args=[self._ns, cid, self._clock(), len(ready), *ready, *hashes])
        return {flat[i].decode(): PodMatch(int(flat[i + 1]), 100.0 * int(flat[i + 1]) / n_blocks)
                for i in range(0, len(flat), 2)}

    def stats(self) -> dict[str, object]:
        ns = self._ns
        counts = {k.decode(): int(v) for k, v in self._redis.hgetall(f"{ns}:n").items()}
        cids = [c.decode() for c in self._redis.zrange(f"{ns}:lru", 0, -1)]
        pipe = self._redis.pipeline(transaction=False)
        for cid in cids:
            pipe.hlen(f"{ns}:x:{cid}")
        prefixes = sum(pipe.execute()) if cids else 0
        pods = set()
        for cid in cids:
            pods.update(self._redis.hkeys(f"{ns}:s:{cid}"))
        return {
            "backend": "redis",
            "contexts": len(cids),
            "pods": len(pods),
            "blocks": counts.get("blocks", 0),
            "prefixes": prefixes,
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
            cid = self._cids[context] = xxh64_hexdigest(
                json.dumps([context[0], int(context[1])]).encode())
        return cid

    def _block_size(self, context: ContextKey, cid: str) -> int | None:
        """The context's block size from Redis (another replica may have created or dropped
        it, so the local cache is only trusted for the id)."""
        raw = self._redis.hget(f"{self._ns}:bs", cid)
        if raw is None:
            return None
        return int(raw)

    def _count(self, name: str) -> None:
        self._redis.hincrby(f"{self._ns}:n", name, 1)

    def _count_contexts(self) -> int:
        return int(self._redis.zcard(f"{self._ns}:lru"))

    def _drop_lru_context(self, keep: str) -> None:
        for cid in (c.decode() for c in self._redis.zrange(f"{self._ns}:lru", 0, 1)):
            if cid != keep:
                log.info("dropping context %s: more than %d contexts", cid,
                         self.config.max_contexts)
                self._drop_context(args=[self._ns, cid])
                return

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

    def _holdings(self, cids: Iterable[str]) -> list[tuple[int, tuple, str, str]]:
        """``(-holdings, (model, lora, pod), cid, pod)`` per pod-context, for victim choice."""
        ns = self._ns
        out = []
        for cid in cids:
            meta = self._redis.hget(f"{ns}:ctx", cid)
            if meta is None:
                continue
            model, lora = json.loads(meta)
            slots = {k.decode(): v.decode()
                     for k, v in self._redis.hgetall(f"{ns}:s:{cid}").items()}
            pipe = self._redis.pipeline(transaction=False)
            for pod, slot in slots.items():
                pipe.zcard(f"{ns}:o:{cid}:{slot}")
            for pod, size in zip(slots, pipe.execute()):
                out.append((-int(size), (model, lora, pod), cid, pod))
        return out

    def _enforce_limits(self, context: ContextKey, cid: str) -> None:
        """Same order as the memory backend: per-context limit first, then the budget."""
        ns = self._ns
        limit = self.config.max_prefixes_per_context
        while True:
            prefixes = int(self._redis.hlen(f"{ns}:x:{cid}"))
            if prefixes <= limit:
                break
            victim = min(self._holdings([cid]))
            self._evict(args=[ns, cid, victim[3], prefixes - limit])
        budget = self.config.max_blocks
        while True:
            total = int(self._redis.hget(f"{ns}:n", "blocks") or 0)
            if total <= budget:
                break
            cids = [c.decode() for c in self._redis.zrange(f"{ns}:lru", 0, -1)]
            victim = min(self._holdings(cids))
            self._evict(args=[ns, victim[2], victim[3], total - budget])
