"""Reading the Redis index: lookups and counts (``RedisPrefixIndex.match_prefix`` /
``stats``). Readers may run on any thread: they use the client's connection pool only and
touch the index object's caches (context ids, block sizes) with single dict operations.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from xxhash import xxh3_128_intdigest

from edgellm.kvindex._rows import chain_hashes
from edgellm.kvindex.api import ContextKey, IndexInputError, PodMatch
from edgellm.kvindex.redis_ingest import pack_u64
from edgellm.kvindex.validate import check_context, check_ready, prompt_bytes

# The index is ``redis_index.RedisPrefixIndex`` (not imported: it imports this module).
Index = Any

__all__ = ["PromptHasher", "match", "stats"]

_CHUNK = 64  # blocks per remembered piece of a prompt's hash chain


class PromptHasher:
    """A prompt's prefix hashes, packed for MATCH, with a cache of 64-block chunks (~1 KB
    each) under an xxh3-128 digest of the chunk's bytes seeded with its parent hash: a
    router sees the same system prompts and chat histories again and again, and a hit
    costs one pass over the bytes instead of the chain's xxh64s (as ``memory_match``).
    ``chunks`` (0: no cache) may be changed at any time; reader threads may race on the
    cache, which at worst loses an entry."""

    def __init__(self, seed: int, chunks: int = 2048) -> None:
        self.seed = seed
        self.chunks = chunks
        self._cache: dict[tuple[int, int], tuple[bytes, int]] = {}

    def packed(self, data: bytes, block_size: int, n_blocks: int) -> bytes:
        seed, cache, width = self.seed, self._cache, 4 * block_size
        if self.chunks <= 0:
            return pack_u64(chain_hashes(data[: n_blocks * width], block_size, seed, seed))
        out = []
        h = seed
        for start in range(0, n_blocks, _CHUNK):
            piece = data[start * width:min(n_blocks, start + _CHUNK) * width]
            key = (xxh3_128_intdigest(piece, h), block_size)
            hit = cache.get(key)
            if hit is None:
                hashes = chain_hashes(piece, block_size, seed, h)
                hit = (pack_u64(hashes), hashes[-1])
                if len(cache) >= self.chunks:
                    cache.clear()
                cache[key] = hit
            out.append(hit[0])
            h = hit[1]
        return b"".join(out)


def match(index: Index, context: ContextKey, token_ids: Sequence[int],
          ready_pods: Iterable[str] | None) -> dict[str, PodMatch]:
    """One round trip: a MATCH script per shard of the context (one, unless pods are
    spread over a cluster), sent together. A context whose block size this client has not
    seen costs one more, once."""
    check_context(context)
    data = prompt_bytes(token_ids)
    ready = _ready(index, ready_pods)
    cid = index._cid(context)
    placement = index.placement
    shards = placement.shards(cid)
    block_size = index._block_sizes.get(cid)
    if block_size is None:
        block_size = _fetch_block_size(index, cid, shards)
        if block_size is None:
            return {}
    now = repr(index._clock())
    for _ in range(2):
        n_blocks = len(data) // (4 * block_size)
        packed = index._hasher.packed(data, block_size, n_blocks) if n_blocks else b""
        calls = []
        for shard in shards:
            if ready is None:
                calls.append(("MATCH", shard, [now, str(block_size), "-1", b"", packed]))
                continue
            if len(shards) == 1:
                pods, pods_arg = ready
            else:
                pods = [p for p in ready[0] if placement.shard(cid, p) == shard]
                pods_arg = _pack_pods(pods)
            if pods:
                calls.append(("MATCH", shard, [now, str(block_size), str(len(pods)),
                                               pods_arg, packed]))
        if not calls:  # (no ready pod: the context's clock is still touched)
            calls = [("MATCH", shards[0], [now, str(block_size), "0", b"", packed])]
        replies = index._runner.run(calls)
        if any(r and r[0] == b"bs" for r in replies):  # dropped and made again meanwhile
            sizes = [int(r[1]) for r in replies if r and r[0] == b"bs"]
            block_size = index._block_sizes[cid] = sizes[0]
            continue
        out: dict[str, PodMatch] = {}
        for flat in replies:
            for i in range(0, len(flat), 2):
                n = int(flat[i + 1])
                out[flat[i].decode()] = PodMatch(n, 100.0 * n / n_blocks)
        return out if len(shards) == 1 else dict(sorted(out.items()))
    return {}


def _ready(index: Index, ready_pods: Iterable[str] | None):
    """``None`` or ``(pods sorted and distinct, packed)`` (the script touches in this
    order); a router asks with the same pods again and again: remembered."""
    if ready_pods is None:
        return None
    key = tuple(ready_pods) if type(ready_pods) in (list, tuple) else None
    if key is not None:
        try:
            found = index._ready_cache.get(key)
        except TypeError:  # unhashable items: check_ready says what is wrong
            found = None
        if found is not None:
            return found
    pods = sorted(set(check_ready(ready_pods)))
    found = (pods, _pack_pods(pods))
    if key is not None:
        if len(index._ready_cache) >= 256:
            index._ready_cache.clear()
        index._ready_cache[key] = found
    return found


def _pack_pods(pods: list[str]) -> bytes:
    """Pod keys in one argument: each as 2 bytes of length and its UTF-8 bytes."""
    out = bytearray()
    for pod in pods:
        raw = pod.encode()
        if len(raw) > 0xFFFF:
            raise IndexInputError(f"pod key too long: {pod[:40]!r}...")
        out += len(raw).to_bytes(2, "big") + raw
    return bytes(out)


def stats(index: Index) -> dict[str, object]:
    """``PrefixIndex.stats``; with pods spread over shards, a prefix two shards hold counts
    twice in ``prefixes``."""
    placement = index.placement
    client = index._redis
    shards = index._all_shards()
    replies = index._runner.run([("STATS", s, []) for s in shards]) if shards else []
    pods: set[bytes] = set()
    for reply in replies:
        pods.update(reply[1:])
    counts: dict[str, int] = {}
    for scope in ({placement.scope(s) for s in shards} if placement.cluster
                  else {placement.ns}):
        for k, v in client.hgetall(f"{scope}:n").items():
            counts[k.decode()] = counts.get(k.decode(), 0) + int(v)
    return {
        "backend": "redis",
        "placement": placement.placement if placement.cluster else "standalone",
        "contexts": len(_contexts_in(index, shards)) if placement.cluster else len(shards),
        "pods": len(pods),
        "blocks": counts.get("blocks", 0),
        "prefixes": sum(int(r[0]) for r in replies),
        **{k: counts.get(k, 0) for k in ("evicted_blocks", "evicted_contexts",
                                         "unknown_parent", "invalid_tokens",
                                         "block_size_mismatch")},
    }


def _fetch_block_size(index: Index, cid: str, shards: list[str]) -> int | None:
    """The context's block size, from the first of its shards that has one."""
    pipe = index._redis.pipeline(transaction=False)
    for shard in shards:
        pipe.hget(f"{index.placement.scope(shard)}:bs", shard)
    for raw in pipe.execute():
        if raw is not None:
            if len(index._block_sizes) >= 4096:
                index._block_sizes.clear()
            index._block_sizes[cid] = int(raw)
            return int(raw)
    return None


def _contexts_in(index: Index, shards: list[str]) -> set[str]:
    """Cluster: the contexts of these shards that still exist (a block size set)."""
    pipe = index._redis.pipeline(transaction=False)
    for s in shards:
        pipe.hexists(f"{s}:bs", s)
    alive = [s for s, ok in zip(shards, pipe.execute()) if ok]
    return {s.split("{", 1)[1].split(":")[0].rstrip("}") for s in alive}
