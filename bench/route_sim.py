"""Routing simulation: hit rate of cache-aware routing vs round-robin, random and an oracle.

N engines (``bench/_sim.py``), each a real LRU block cache, serve a seedable shared-prefix
workload (multi-turn chats on a few shared system prompts). For ``cache-aware`` every
engine publishes its stores and evictions through a real ``KVEventPublisher`` over
loopback TCP to a ``KVEventManager`` feeding a ``MemoryPrefixIndex``, and the
``Router`` (AIBrix policy) reads that index; each request's events are applied before the
next request is routed (the index is as fresh as the pipeline allows, no fresher). The
``oracle`` uses the same router on the engines' caches read directly. Hit rate = cached
prompt tokens / prompt tokens; load = requests per engine (max / mean).

Targets: cache-aware >= 90% of the oracle and >= 3x round-robin; max/mean load <= 1.5.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _sim import (  # noqa: E402
    BS,
    MODEL,
    CacheOracle,
    PolicyResult,
    WorkloadConfig,
    make_engines,
    random_choice,
    round_robin,
    router_chooser,
    simulate,
)

from edgellm.discovery.pod import Pod  # noqa: E402
from edgellm.discovery.provider import StaticPodProvider  # noqa: E402
from edgellm.kvevents.config import ManagerConfig  # noqa: E402
from edgellm.kvevents.manager import KVEventManager  # noqa: E402
from edgellm.kvevents.publisher import KVEventPublisher, PublisherConfig  # noqa: E402
from edgellm.kvindex.config import IndexConfig  # noqa: E402
from edgellm.kvindex.memory import MemoryPrefixIndex  # noqa: E402
from edgellm.kvindex.router import Router, RouterConfig  # noqa: E402

APPLY_TIMEOUT_S = 30.0


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def run_cache_aware(cfg: WorkloadConfig, n_engines: int, capacity: int,
                    router_config: RouterConfig) -> dict[str, object]:
    engines = make_engines(n_engines, capacity, cfg.seed)
    pub_config = PublisherConfig(pub_endpoint="tcp://127.0.0.1:*",
                                 replay_endpoint="tcp://127.0.0.1:*")
    publishers = {pod: KVEventPublisher(pub_config).start() for pod in engines}
    index = MemoryPrefixIndex(IndexConfig(max_prefixes_per_context=10**7, max_blocks=10**7))
    try:
        provider = StaticPodProvider(
            Pod(pod, "127.0.0.1", MODEL, pub_port=_port(p.pub_endpoint),
                router_port=_port(p.replay_endpoint))
            for pod, p in publishers.items())
        with KVEventManager(provider, index, config=ManagerConfig(enabled=True)) as manager:
            for pod, pub in publishers.items():  # every subscriber connected and applying
                if not manager.wait_applied(pod, pub.publish([]), APPLY_TIMEOUT_S):
                    raise RuntimeError(f"{pod}: the subscriber did not connect")
            published = {"batches": 0, "events": 0}

            def publish(engine, events) -> None:
                seq = publishers[engine.pod_key].publish(events)
                published["batches"] += 1
                published["events"] += len(events)
                if not manager.wait_applied(engine.pod_key, seq, APPLY_TIMEOUT_S):
                    raise RuntimeError(f"{engine.pod_key}: batch {seq} not applied")

            result = PolicyResult()
            router = Router(index, router_config, block_size=BS)
            t0 = time.perf_counter()
            simulate(cfg, engines, router_chooser(router, result), publish, result)
            elapsed = time.perf_counter() - t0
            stats = index.stats()
        engine_blocks = sum(len(e.cache) for e in engines.values())
        out = result.as_dict()
        out.update({
            "published": published,
            "index_blocks": stats["blocks"],
            "engine_blocks": engine_blocks,
            "unknown_parent": stats["unknown_parent"],
            "seconds": round(elapsed, 2),
        })
        return out
    finally:
        for pub in publishers.values():
            pub.stop()
        index.close()


def run_policy(name: str, cfg: WorkloadConfig, n_engines: int, capacity: int,
               router_config: RouterConfig) -> dict[str, object]:
    engines = make_engines(n_engines, capacity, cfg.seed)
    result = PolicyResult()
    if name == "oracle":
        choose = router_chooser(Router(CacheOracle(engines), router_config, block_size=BS), result)
    elif name == "round-robin":
        choose = round_robin(engines)
    else:
        choose = random_choice(engines, cfg.seed)
    simulate(cfg, engines, choose, None, result)
    return result.as_dict()


def run(cfg: WorkloadConfig, n_engines: int, capacity: int,
        router_config: RouterConfig | None = None) -> dict[str, object]:
    router_config = router_config or RouterConfig()
    out: dict[str, object] = {
        "bench": "route_sim",
        "engines": n_engines,
        "capacity_blocks": capacity,
        "block_size": BS,
        "workload": {"conversations": cfg.conversations, "system_prompts": cfg.system_prompts,
                     "turns": list(cfg.turns), "seed": cfg.seed},
    }
    policies = {"cache-aware": run_cache_aware(cfg, n_engines, capacity, router_config)}
    for name in ("oracle", "round-robin", "random"):
        policies[name] = run_policy(name, cfg, n_engines, capacity, router_config)
    out["policies"] = policies
    aware = policies["cache-aware"]["hit_rate"]
    out["hit_rate"] = {name: p["hit_rate"] for name, p in policies.items()}
    out["max_over_mean_load"] = {name: p["max_over_mean_load"] for name, p in policies.items()}
    out["cache_aware_vs_oracle"] = round(aware / policies["oracle"]["hit_rate"], 3)
    out["cache_aware_vs_round_robin"] = round(aware / policies["round-robin"]["hit_rate"], 2)
    out["targets"] = {"vs_oracle_min": 0.9, "vs_round_robin_min": 3.0, "max_over_mean_load_max": 1.5}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=8)
    parser.add_argument("--capacity", type=int, default=6000, help="blocks per engine")
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policy", choices=("aibrix", "weighted"), default="aibrix")
    args = parser.parse_args()
    cfg = WorkloadConfig(conversations=args.conversations, seed=args.seed)
    print(json.dumps(run(cfg, args.engines, args.capacity, RouterConfig(policy=args.policy))))


if __name__ == "__main__":
    main()
