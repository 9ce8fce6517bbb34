"""Ingest speed of the prefix index: decode + index of KV event batches, one core.

Payload mix (vLLM, chat traffic with long prompts): per request one BlockStored of the
uncached part of its prompt (32..256 blocks, mean 144; a third start a new chain, the rest
continue an earlier request of the same pod: multi-turn), then one 1-block BlockStored per
16 generated tokens (4..32 events, mean 18), each chained on the previous block. Events are
grouped 17 to a batch, as one scheduler step publishes them; 16-token blocks, token ids up
to 128k, 64-bit engine hashes, 8 pods. About 11% of the blocks come in 1-block events, and
those are most of the events (a 1-block event costs ~3x a block of a big one).

Measured in the same run, on the same payloads:

- ``decode_only``: ``edgellm.protocol.kv_events.decode_batch`` alone;
- ``reference``: the straightforward pipeline (decode, per block ``struct.pack`` of its
  tokens + xxh64 on ``parent.to_bytes(8) + tokens``, a dict of sets of pods and a dict of
  engine hashes);
- ``index``: decode + ``MemoryPrefixIndex.process_block_stored`` per event, dispatched as
  the pipeline's applier does (without its metrics);
- the same for prefill-only and decode-only (1-block) payloads, to show the two extremes;
- ``at_budget``: the steady state of a long-running router: the second half of the
  payloads applied to an index whose block budget the first half filled (every store
  then evicts, in batches), beside the same second half applied below the budget;
- ``redis``: the same chat-mix stream (``--redis-blocks`` of it, default all) decoded and
  applied to ``RedisPrefixIndex`` (default budget) on a real redis-server as the
  pipeline's applier does (``submit_batches``: one script per engine batch, ``GROUP``
  batches per pipelined round trip, the next group sent before the previous one is read),
  beside memory on the very same payloads in the same run (ratio), with the CPU per block
  of redis-server and of this process; below and at its budget (at the budget: every
  pod's holdings checked against what it stored, leaf before parent, and the block count
  within 5% of the budget); and ``end_to_end`` (below) into Redis;
- ``end_to_end``: ``KVEventPublisher`` -> loopback TCP -> ``KVEventManager`` (subscriber,
  applier) -> ``MemoryPrefixIndex``, from the first publish to the last block applied
  (the payloads reach the engines' process before the clock starts).

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import struct
import sys
import time

from xxhash import xxh64_intdigest

from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.hashing import DEFAULT_SEED
from edgellm.kvindex.memory import MemoryPrefixIndex
from edgellm.protocol.kv_events import BlockStored, EventBatch, decode_batch, encode_batch

BS = 16
EVENTS_PER_BATCH = 17


def make_streams(n_blocks: int, pods: int, seed: int, mix: str = "chat") -> dict[str, list]:
    """Per pod, its list of events in publish order (see the module docstring)."""
    rng = random.Random(seed)
    pool = rng.choices(range(300, 128_000), k=1 << 20)
    streams: dict[str, list] = {f"ns/engine-{k}": [] for k in range(pods)}
    tails: dict[str, list[int]] = {pod: [] for pod in streams}
    made = 0
    root = 0

    def tokens(n: int) -> list[int]:
        start = rng.randrange(len(pool) - n)
        return pool[start:start + n]

    while made < n_blocks:
        pod = f"ns/engine-{rng.randrange(pods)}"
        events = streams[pod]
        if mix != "decode":
            n = rng.randint(32, 256)
            parent = None
            if tails[pod] and rng.random() < 2 / 3:
                parent = rng.choice(tails[pod])
                toks = tokens(n * BS)
            else:
                root += 1
                toks = [root] + tokens(n * BS - 1)  # a new chain: its first block is unique
            hashes = [rng.getrandbits(64) for _ in range(n)]
            events.append(BlockStored(hashes, parent, toks, BS, None, "GPU", None))
            made += n
            last = hashes[-1]
        else:
            root += 1
            last = rng.getrandbits(64)
            events.append(BlockStored([last], None, [root] + tokens(BS - 1), BS, None, "GPU", None))
            made += 1
        if mix != "prefill":
            for _ in range(rng.randint(4, 32)):
                h = rng.getrandbits(64)
                events.append(BlockStored([h], last, tokens(BS), BS, None, "GPU", None))
                last = h
                made += 1
        tails[pod].append(last)
    return streams


def encode_streams(streams: dict[str, list]) -> tuple[list[tuple[str, bytes]], int]:
    payloads = []
    blocks = 0
    for pod, events in streams.items():
        for i in range(0, len(events), EVENTS_PER_BATCH):
            chunk = events[i:i + EVENTS_PER_BATCH]
            blocks += sum(len(ev.block_hashes) for ev in chunk)
            payloads.append((pod, encode_batch(EventBatch(time.time(), chunk), "array")))
    return payloads, blocks


class ReferenceIndex:
    """The straightforward implementation ingest is compared with."""

    def __init__(self) -> None:
        self.index: dict[int, set[str]] = {}
        self.engine: dict[tuple[str, int], int] = {}

    def store(self, pod: str, hashes, parent, tokens, bs: int) -> None:
        h = DEFAULT_SEED if parent is None else self.engine.get((pod, parent))
        if h is None:
            return
        for i, e in enumerate(hashes):
            block = struct.pack(f">{bs}I", *tokens[i * bs:(i + 1) * bs])
            h = xxh64_intdigest(h.to_bytes(8, "little") + block, DEFAULT_SEED)
            self.engine[(pod, e)] = h
            self.index.setdefault(h, set()).add(pod)


def run_decode(payloads) -> None:
    for _, payload in payloads:
        decode_batch(payload)


def run_reference(payloads) -> ReferenceIndex:
    ref = ReferenceIndex()
    for pod, payload in payloads:
        for ev in decode_batch(payload).events:
            ref.store(pod, ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size)
    return ref


def apply(index, payloads) -> None:
    """Decode and apply, dispatching like ``edgellm.kvevents.handler`` does."""
    context = ("bench-model", -1)
    store = index.process_block_stored
    for pod, payload in payloads:
        for ev in decode_batch(payload).events:
            if type(ev) is BlockStored:
                store(context, pod, ev.block_hashes, ev.parent_block_hash, ev.token_ids,
                      ev.block_size)


def big_config() -> IndexConfig:
    return IndexConfig(max_prefixes_per_context=10**8, max_blocks=10**8)


def run_index(payloads) -> MemoryPrefixIndex:
    index = MemoryPrefixIndex(big_config())
    apply(index, payloads)
    return index


def best_rate(fn, payloads, blocks: int, repeat: int) -> float:
    """Blocks per second of the best of ``repeat`` runs; what a run built is freed after
    its clock stops (tearing down a big index is not ingest)."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        built = fn(payloads)
        best = min(best, time.perf_counter() - t0)
        if isinstance(built, MemoryPrefixIndex):
            stats = built.stats()
            assert stats["unknown_parent"] == 0 and stats["blocks"] == blocks, stats
        del built
    return blocks / best


def measure(payloads, blocks: int, repeat: int, with_reference: bool = True) -> dict[str, object]:
    out: dict[str, object] = {"blocks": blocks, "batches": len(payloads)}
    out["decode_only_blocks_per_s"] = round(best_rate(run_decode, payloads, blocks, repeat))
    if with_reference:
        out["reference_blocks_per_s"] = round(best_rate(run_reference, payloads, blocks, repeat))
    out["index_blocks_per_s"] = round(best_rate(run_index, payloads, blocks, repeat))
    if with_reference:
        out["speedup_vs_reference"] = round(
            out["index_blocks_per_s"] / out["reference_blocks_per_s"], 2)
    out["index_share_of_decode_speed"] = round(
        out["index_blocks_per_s"] / out["decode_only_blocks_per_s"], 2)
    return out


def timed_second_half(make_index, payloads, how=apply) -> tuple[float, int, object]:
    """Apply the first half of ``payloads`` untimed, then time the second half. Returns
    ``(seconds, blocks of the second half, index)``."""
    half = len(payloads) // 2
    index = make_index()
    how(index, payloads[:half])
    blocks = sum(len(ev.block_hashes) for _, p in payloads[half:]
                 for ev in decode_batch(p).events)
    gc.collect()
    t0 = time.perf_counter()
    how(index, payloads[half:])
    return time.perf_counter() - t0, blocks, index


def check_at_budget(index, payloads, budget: int) -> dict[str, object]:
    """The invariants at the budget: every block a pod is said to hold is one it stored
    and did not lose to eviction before its descendants (no over-claim: each pod's match
    of each stored chain ends where its rows end, and a chain's leaves went first), and the
    block count is within 5% of the budget."""
    from bench_check import held_prefixes_ok

    stats = index.stats()
    ok = held_prefixes_ok(index, payloads)
    return {"within_5pct_of_budget": abs(stats["blocks"] - budget) <= 0.05 * budget,
            "no_over_claim_leaves_first": ok}


def measure_at_budget(make_index, payloads, budget: int, how=apply) -> dict[str, object]:
    """Second-half ingest below the budget and at it (``make_index(max_blocks)``)."""
    below_s, blocks, below = timed_second_half(lambda: make_index(10**8), payloads, how)
    below.close()
    at_s, _, at = timed_second_half(lambda: make_index(budget), payloads, how)
    stats = at.stats()
    checks = check_at_budget(at, payloads, budget)
    at.close()
    return {"blocks_timed": blocks, "budget": budget,
            "below_budget_blocks_per_s": round(blocks / below_s),
            "at_budget_blocks_per_s": round(blocks / at_s),
            "at_budget_share": round(below_s / at_s, 2),
            "evicted_blocks": stats["evicted_blocks"], "unknown_parent": stats["unknown_parent"],
            **checks}


GROUP = 32  # engine batches per pipelined round trip (the applier drains up to this many)


def apply_batched(index, payloads) -> None:
    """Decode and apply as the applier does for a batch index: groups of ``GROUP``, each
    submitted before the previous one's results are read (Redis runs one while the client
    encodes the next)."""
    from edgellm.kvindex.api import STORED, IndexBatch

    context = ("bench-model", -1)
    group = []
    pending = None
    for i, (pod, payload) in enumerate(payloads):
        events = [(STORED, ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size)
                  for ev in decode_batch(payload).events]
        group.append(IndexBatch(context, pod, events))
        if len(group) == GROUP or i == len(payloads) - 1:
            sent = index.submit_batches(group)
            if pending is not None:
                index.finish_batches(pending)
            pending, group = sent, []
    if pending is not None:
        index.finish_batches(pending)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_redis(payloads, blocks: int, end_to_end_too: bool = True) -> dict[str, object]:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    try:
        from edgellm.kvindex.redis_index import RedisPrefixIndex
        from tests.redis_server import RedisServer, find_redis_server
    except ImportError as exc:
        return {"skipped": str(exc)}
    if find_redis_server() is None:
        return {"skipped": "no redis-server binary"}
    out: dict[str, object] = {"blocks": blocks, "group": GROUP}
    gc.collect()
    t0 = time.perf_counter()
    memory = run_index(payloads)
    out["memory_blocks_per_s"] = round(blocks / (time.perf_counter() - t0))
    memory.close()
    with RedisServer() as server:
        base = server.used_memory()
        # The default budget (1,000,000 blocks): a Redis index sizes its tables for it.
        with RedisPrefixIndex(IndexConfig(), url=server.url) as index:
            gc.collect()
            cpu0, own0 = _cpu_s(server._proc.pid), time.process_time()
            t0 = time.perf_counter()
            apply_batched(index, payloads)
            dt = time.perf_counter() - t0
            redis_cpu, own_cpu = _cpu_s(server._proc.pid) - cpu0, time.process_time() - own0
            stats = index.stats()
            assert stats["blocks"] == blocks and stats["unknown_parent"] == 0, stats
        out["index_blocks_per_s"] = round(blocks / dt)
        # CPU per block (less noisy than wall time on a shared box): the redis-server
        # process's, and this process's (decode, hashing, encoding); the slower of the two
        # bounds the rate, as the two overlap.
        out["redis_cpu_us_per_block"] = round(1e6 * redis_cpu / blocks, 2)
        out["client_cpu_us_per_block"] = round(1e6 * own_cpu / blocks, 2)
        out["used_memory_bytes_per_block"] = round((server.used_memory() - base) / blocks, 1)
        out["redis_share_of_memory_speed"] = round(
            out["index_blocks_per_s"] / out["memory_blocks_per_s"], 3)

        def make(max_blocks: int) -> RedisPrefixIndex:
            config = IndexConfig(max_prefixes_per_context=10**8, max_blocks=max_blocks)
            return RedisPrefixIndex(config, url=server.url, namespace=f"b:{time.monotonic_ns()}")

        out["at_budget"] = measure_at_budget(make, payloads, blocks // 3, apply_batched)
        if end_to_end_too:
            from _e2e import end_to_end

            # The whole pipeline (publishers in another process, subscribers, the apply
            # thread's pipelined groups) into this redis-server, in its own namespace.
            e2e = end_to_end(payloads, blocks, lambda: RedisPrefixIndex(
                IndexConfig(), url=server.url, namespace="e2e"))
            out["end_to_end"] = {**e2e, "target_blocks_per_s": 200_000}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=300_000)
    parser.add_argument("--pods", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--redis-blocks", type=int, default=0,
                        help="blocks of the stream applied to Redis (0: the whole stream)")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--no-end-to-end", action="store_true")
    args = parser.parse_args()

    result: dict[str, object] = {"bench": "ingest", "block_size": BS, "target_blocks_per_s": 1_000_000,
                                 "redis_target_blocks_per_s": 200_000}
    payloads, blocks = encode_streams(make_streams(args.blocks, args.pods, args.seed))
    result["chat_mix"] = measure(payloads, blocks, args.repeat)
    print("chat_mix:", json.dumps(result["chat_mix"]), file=sys.stderr)
    result["at_budget"] = measure_at_budget(
        lambda max_blocks: MemoryPrefixIndex(IndexConfig(max_prefixes_per_context=10**8,
                                                         max_blocks=max_blocks)),
        payloads, blocks // 3)
    print("at_budget:", json.dumps(result["at_budget"]), file=sys.stderr)
    for mix in ("prefill", "decode"):
        p, b = encode_streams(make_streams(args.blocks // (2 if mix == "prefill" else 6),
                                           args.pods, args.seed, mix))
        result[f"{mix}_only"] = measure(p, b, max(1, args.repeat - 1), with_reference=False)
    if not args.no_redis:
        p, b = payloads, blocks
        if args.redis_blocks:
            p, b = encode_streams(make_streams(args.redis_blocks, args.pods, args.seed))
        result["redis"] = measure_redis(p, b, not args.no_end_to_end)
        print("redis:", json.dumps(result["redis"]), file=sys.stderr)
    if not args.no_end_to_end:
        from _e2e import end_to_end
        result["end_to_end"] = end_to_end(payloads, blocks)
    result["index_blocks_per_s"] = result["chat_mix"]["index_blocks_per_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
