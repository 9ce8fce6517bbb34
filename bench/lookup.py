"""Lookup latency and memory of the prefix index.

Index: 1,000,000 blocks over 64 pods (15,625 per pod, in chains of 64 blocks), engine
hashes as the event decoder makes them (64-bit ints). Two 8,192-token prompts (512 blocks)
are held, and queried with all 64 pods ready:

- ``typical``: a chat prompt: its first 64 blocks (a 1k-token system prompt) are held by 16
  pods, all 512 by one of them;
- ``adversarial``: pod k holds its first 8*(k+1) blocks: 64 different match lengths, so the
  walk never stops early and 64 pods drop out at 64 places;
- ``miss``: a prompt nobody holds.

Each is timed (1,000 calls in 5 rounds) ``cold`` (match cache off: every block's xxh64
computed) and ``warm`` (the match cache knows the prompt's chunks: a router sees the same
system prompts and chat histories again and again), with ``hash_only``
(``hashing.prefix_hashes`` of the prompt) as the floor of a cold lookup on this machine.
The headline (``p99_us``, ``cold_p99_us``) is the p99 over all rounds; ``p99_best_round_us``
(the best round's, free of the scheduler slices other processes take on a shared box) is
reported beside it, not instead of it.

Memory: resident memory (RSS) the index adds, per (pod, block) holding, each size built in
a fresh child process whose RSS is read before and after the build (a 64-bit int costs 48
bytes of RSS where ``sys.getsizeof`` says 36, and dicts resize in steps, so RSS is what
counts; sizes on both sides of a resize are measured). All but ~25,000 of 1,000,000
holdings are blocks held by exactly one pod, the case the target (<= 150 B) is about.

Redis (if a ``redis-server`` binary is found): the same index (``--redis-blocks``, default
1,000,000 over the same 64 pods, stored through ``apply_batches`` as the pipeline does) and
the same queries, warm and cold as above (the client's cache of prompt hash chains on or
off), each one round trip (one MATCH script); ``used_memory`` of the server before and
after the build, per block; its p99s over the memory backend's from this run.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import msgspec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _workload import BLOCK, chain_tokens, rounds_us, time_calls  # noqa: E402

from edgellm.kvindex.config import IndexConfig  # noqa: E402
from edgellm.kvindex.hashing import prefix_hashes  # noqa: E402
from edgellm.kvindex.memory import MemoryPrefixIndex  # noqa: E402

CONTEXT = ("bench-model", -1)
PROMPT_BLOCKS = 512
CHAIN = 64


ADVERSARIAL = chain_tokens(1, PROMPT_BLOCKS)
TYPICAL = chain_tokens(2, PROMPT_BLOCKS)
MISS = chain_tokens(5, PROMPT_BLOCKS)
SYSTEM_BLOCKS = 64
# Filler chains take their tokens from this pool (made before the RSS baseline), so the
# build does not also count 16 million fresh token ints.
_POOL = chain_tokens(3, 4 * CHAIN)


def filler_tokens(chain_id: int, n_blocks: int) -> list[int]:
    """A chain no other shares (its first token is ``chain_id``), without new token ints."""
    start = (chain_id * 7) % (len(_POOL) - n_blocks * BLOCK)
    return [chain_id] + _POOL[start:start + n_blocks * BLOCK - 1]


def engine_hashes(start: int, n: int) -> list[int]:
    """``n`` 64-bit engine hashes as the msgpack decoder hands them over (exact-size ints)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(list(range(start, start + n))))


def prompt_shares(k: int) -> list[tuple[list[int], int]]:
    """(prompt, blocks held) of pod ``k``."""
    shares = [(ADVERSARIAL, min(PROMPT_BLOCKS, 8 * (k + 1)))]
    if k < 16:
        shares.append((TYPICAL, PROMPT_BLOCKS if k == 0 else SYSTEM_BLOCKS))
    return shares


def build(index, blocks: int, pods: int) -> int:
    """Fill ``index``; returns the holdings count."""
    per_pod = blocks // pods
    next_hash = 1 << 63  # 64-bit engine hashes, as vLLM's
    chain_id = 10
    holdings = 0
    for k in range(pods):
        pod = f"ns/pod-{k:02d}"
        left = per_pod
        for prompt, share in prompt_shares(k):
            hashes = engine_hashes(next_hash, share)
            next_hash += share
            index.process_block_stored(CONTEXT, pod, hashes, None, prompt[: share * BLOCK], BLOCK)
            holdings += share
            left -= share
        while left > 0:
            n = min(CHAIN, left)
            hashes = engine_hashes(next_hash, n)
            next_hash += n
            index.process_block_stored(CONTEXT, pod, hashes, None, filler_tokens(chain_id, n), BLOCK)
            chain_id += 1
            left -= n
            holdings += n
    return holdings


def measure_lookups(index, pods: int, n: int, cold: bool = True) -> dict[str, object]:
    ready = [f"ns/pod-{k:02d}" for k in range(pods)]
    got = index.match_prefix(CONTEXT, ADVERSARIAL, ready)
    assert got[ready[-1]].matched_blocks == PROMPT_BLOCKS and got[ready[0]].matched_blocks == 8
    got = index.match_prefix(CONTEXT, TYPICAL, ready)
    assert got[ready[0]].matched_blocks == PROMPT_BLOCKS and got[ready[1]].matched_blocks == 64
    assert len(got) == 16 and index.match_prefix(CONTEXT, MISS, ready) == {}
    out: dict[str, object] = {}
    modes = [("warm", None)]
    if cold:
        modes.append(("cold", 0))
    for mode, cache in modes:
        saved = getattr(index, "match_cache_chunks", None)
        if cache is not None:
            index.match_cache_chunks = cache
        for name, prompt in (("typical", TYPICAL), ("adversarial", ADVERSARIAL), ("miss", MISS)):
            call = lambda: index.match_prefix(CONTEXT, prompt, ready)  # noqa: E731
            time_calls(call, 20)
            out[f"{name}_{mode}"] = rounds_us(call, n)
        if cache is not None:
            index.match_cache_chunks = saved
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_child(blocks: int, pods: int) -> dict[str, object]:
    """Run in a fresh process: the RSS one index of ``blocks`` over ``pods`` adds."""
    config = IndexConfig(max_prefixes_per_context=blocks * 2, max_blocks=blocks * 2)
    gc.collect()
    base = rss_bytes()
    index = MemoryPrefixIndex(config)
    holdings = build(index, blocks, pods)
    gc.collect()
    grown = rss_bytes() - base
    stats = index.stats()
    return {"blocks": holdings, "pods": pods, "distinct_prefixes": stats["prefixes"],
            "rss_bytes_per_block": round(grown / holdings, 1),
            "approx_bytes_per_block": round(stats["approx_bytes"] / holdings, 1)}


def measure_rss(sizes: list[int], pods: int) -> list[dict[str, object]]:
    out = []
    for blocks in sizes:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child",
                                str(blocks), "--pods", str(pods)],
                               capture_output=True, text=True, check=True)
        out.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return out


def memory_backend(blocks: int, pods: int, lookups: int) -> dict[str, object]:
    config = IndexConfig(max_prefixes_per_context=blocks * 2, max_blocks=blocks * 2)
    index = MemoryPrefixIndex(config)
    t0 = time.perf_counter()
    holdings = build(index, blocks, pods)
    build_s = time.perf_counter() - t0
    stats = index.stats()
    assert stats["blocks"] == holdings, stats
    out = {
        "blocks": holdings,
        "pods": pods,
        "distinct_prefixes": stats["prefixes"],
        "holdings_per_prefix": round(holdings / stats["prefixes"], 3),
        "build_blocks_per_s": round(holdings / build_s),
    }
    out.update(measure_lookups(index, pods, lookups))
    out["hash_only_8k_prompt"] = rounds_us(lambda: prefix_hashes(ADVERSARIAL, BLOCK), lookups)
    index.close()
    return out


class _Batcher:
    """Stores through ``apply_batches`` in groups (as the pipeline does), for ``build``."""

    def __init__(self, index) -> None:
        self.index = index
        self.group: list = []

    def process_block_stored(self, context, pod, hashes, parent, tokens, block_size):
        from edgellm.kvindex.api import STORED, IndexBatch

        self.group.append(IndexBatch(context, pod, [(STORED, hashes, parent, tokens,
                                                     block_size)]))
        if len(self.group) == 64:
            self.flush()

    def flush(self) -> None:
        if self.group:
            for result in self.index.apply_batches(self.group):
                assert result[0].stored > 0, result
            self.group = []


def build_redis(index, blocks: int, pods: int) -> int:
    batcher = _Batcher(index)
    holdings = build(batcher, blocks, pods)
    batcher.flush()
    return holdings


def redis_index_server():
    """``(RedisPrefixIndex, RedisServer)`` classes, or a reason they cannot run."""
    try:
        from edgellm.kvindex.redis_index import RedisPrefixIndex
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "tests"))
        from redis_server import RedisServer, find_redis_server
    except ImportError as exc:
        return f"redis backend unavailable: {exc}"
    if find_redis_server() is None:
        return "no redis-server binary"
    return RedisPrefixIndex, RedisServer


def redis_backend(blocks: int, pods: int, lookups: int) -> dict[str, object]:
    found = redis_index_server()
    if isinstance(found, str):
        return {"skipped": found}
    RedisPrefixIndex, RedisServer = found
    config = IndexConfig(max_prefixes_per_context=blocks * 2, max_blocks=blocks * 2)
    with RedisServer() as server, RedisPrefixIndex(config, url=server.url) as index:
        base = server.used_memory()
        t0 = time.perf_counter()
        holdings = build_redis(index, blocks, pods)
        build_s = time.perf_counter() - t0
        stats = index.stats()
        assert stats["blocks"] == holdings, stats
        out = {"blocks": holdings, "pods": pods, "distinct_prefixes": stats["prefixes"],
               "build_blocks_per_s": round(holdings / build_s),
               "used_memory_bytes_per_block": round((server.used_memory() - base) / holdings,
                                                    1)}
        # warm: the client remembers the prompts' hash chains (match_cache_chunks, as
        # memory does); cold: every lookup hashes its prompt. Redis walks it either way.
        out.update(measure_lookups(index, pods, lookups))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--pods", type=int, default=64)
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--rss-sizes", default="250000,720000,1000000",
                        help="index sizes whose RSS per block is measured (comma-separated)")
    parser.add_argument("--redis-blocks", type=int, default=1_000_000)
    parser.add_argument("--redis-lookups", type=int, default=1000)
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.pods)))
        return
    rss = measure_rss([int(n) for n in args.rss_sizes.split(",") if n], args.pods)
    print("rss:", json.dumps(rss), file=sys.stderr)
    memory = memory_backend(args.blocks, args.pods, args.lookups)
    print("memory:", json.dumps(memory), file=sys.stderr)
    timed = {k: v for k, v in memory.items() if isinstance(v, dict)}
    cold = {k: v["p99_us"] for k, v in timed.items() if k.endswith("_cold")}
    result = {
        "bench": "lookup",
        "prompt_tokens": PROMPT_BLOCKS * BLOCK,
        "memory": memory,
        "rss": rss,
        "targets": {"p99_us_max": 200, "bytes_per_block_max": 150},
        "cold_p99_us": max(cold.values()),
        "p99_us": {k: v["p99_us"] for k, v in timed.items()},
        "p99_best_round_us": {k: v["p99_best_round_us"] for k, v in timed.items()},
        "bytes_per_block": max(r["rss_bytes_per_block"] for r in rss) if rss else None,
    }
    if not args.no_redis:
        red = result["redis"] = redis_backend(args.redis_blocks, args.pods, args.redis_lookups)
        if "skipped" not in red:
            result["redis"]["targets"] = {"typical_p99_us_max": 1000,
                                          "adversarial_p99_us_max": 2000,
                                          "bytes_per_block_max": 120}
            result["redis"]["p99_us"] = {k: v["p99_us"] for k, v in red.items()
                                         if isinstance(v, dict) and "p99_us" in v}
            result["redis"]["p99_vs_memory"] = {
                k: round(v["p99_us"] / memory[k]["p99_us"], 1)
                for k, v in red.items() if isinstance(v, dict) and "p99_us" in v}
        print("redis:", json.dumps(result["redis"]), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
