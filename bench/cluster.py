"""The Redis backend on a three-master Redis Cluster: both key placements, measured.

``context`` placement keeps a context in one slot: a lookup is one script on one master,
but all of one model's index (memory, writes, lookups) lands on that master. ``pod``
placement splits a context over ``--pod-groups`` shards by pod: memory and writes spread
over the masters, and a lookup is one script per shard, sent to every master at once.

The same index is built in each (``lookup.py``'s: ``--blocks`` over 64 pods, stored through
``apply_batches`` in groups) and the same queries are timed (typical / adversarial / miss,
all pods ready). Measured per placement: build rate, lookup percentiles, and how the work
and memory spread over the masters (``used_memory`` delta and script calls per master,
max / mean). Baseline in the same run: one plain redis-server with the same index.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import redis  # noqa: E402
from lookup import build_redis, measure_lookups  # noqa: E402

from edgellm.kvindex.config import IndexConfig  # noqa: E402
from edgellm.kvindex.redis_index import RedisPrefixIndex  # noqa: E402


def _node_stats(ports: list[int]) -> list[dict[str, int]]:
    out = []
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            calls = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
            out.append({"used_memory": int(client.info("memory")["used_memory"]),
                        "evalsha_calls": int(calls)})
        finally:
            client.close()
    return out


def _spread(before: list[dict], after: list[dict], key: str) -> dict[str, object]:
    deltas = [a[key] - b[key] for a, b in zip(after, before)]
    mean = sum(deltas) / len(deltas)
    return {"per_master": deltas, "max_over_mean": round(max(deltas) / mean, 2) if mean else None}


def measure(url: str, ports: list[int], placement: str, blocks: int, pods: int,
            lookups: int, groups: int) -> dict[str, object]:
    config = IndexConfig(max_prefixes_per_context=blocks * 2, max_blocks=blocks * 2,
                         redis_placement=placement, redis_pod_groups=groups)
    with RedisPrefixIndex(config, url=url, namespace=f"bench:{placement}") as index:
        before = _node_stats(ports)
        t0 = time.perf_counter()
        holdings = build_redis(index, blocks, pods)
        build_s = time.perf_counter() - t0
        built = _node_stats(ports)
        out: dict[str, object] = {
            "placement": index.stats()["placement"], "blocks": holdings,
            "shards_per_context": index.placement.groups,
            "build_blocks_per_s": round(holdings / build_s),
            "used_memory_bytes_per_block": round(
                sum(a["used_memory"] - b["used_memory"] for a, b in zip(built, before))
                / holdings, 1),
            "memory_spread": _spread(before, built, "used_memory"),
            "build_scripts_spread": _spread(before, built, "evalsha_calls"),
        }
        out.update(measure_lookups(index, pods, lookups))  # warm and cold, as lookup.py
        out["lookup_scripts_spread"] = _spread(built, _node_stats(ports), "evalsha_calls")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=300_000)
    parser.add_argument("--pods", type=int, default=64)
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--pod-groups", type=int, default=12)
    args = parser.parse_args()
    from redis_cluster import RedisCluster
    from redis_server import RedisServer

    result: dict[str, object] = {"bench": "cluster", "blocks": args.blocks, "pods": args.pods}
    with RedisServer() as server:
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        result["one_server"] = measure(server.url, [port], "context", args.blocks, args.pods,
                                       args.lookups, args.pod_groups)
    print("one_server:", json.dumps(result["one_server"]), file=sys.stderr)
    with RedisCluster() as cluster:
        for placement in ("context", "pod"):
            result[placement] = measure(cluster.url, cluster.ports, placement, args.blocks,
                                        args.pods, args.lookups, args.pod_groups)
            print(f"{placement}:", json.dumps(result[placement]), file=sys.stderr)
    result["p99_us"] = {
        name: {k: v["p99_us"] for k, v in result[name].items()
               if isinstance(v, dict) and "p99_us" in v}
        for name in ("one_server", "context", "pod")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
