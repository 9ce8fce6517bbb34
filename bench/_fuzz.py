"""Fuzzed KV event traffic through the real pipeline (``bench/fuzz_events.py``, the tests).

:func:`run` pushes ``payloads`` malformed payloads, and the rest of ``_fuzz_traffic``'s mix
around them, through ``WirePublisher`` -> loopback TCP -> ``KVEventManager`` ->
``MemoryPrefixIndex``, and returns what was sent and what the metrics counted, with
``ok`` true when every malformed thing was counted under its error type, every valid
batch applied once, the index equals the engine's cache (at the end and at checkpoints),
nothing crashed and nothing hung.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from _fuzz_traffic import BLOCK, Engine, Traffic, WirePublisher
from edgellm.discovery.pod import Pod
from edgellm.discovery.provider import StaticPodProvider
from edgellm.kvevents.config import ManagerConfig, SubscriberConfig
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex

POD = "ns/fuzz"


def _wrong_chains(engine: Engine, index: MemoryPrefixIndex) -> int:
    """Chains of the engine's cache the index does not match to their full depth."""
    wrong = 0
    for h in [h for h in engine.held if not engine.children[h]]:
        tokens, depth = engine.prefix(h)
        got = index.match_prefix(("m", -1), tokens, [POD]).get(POD)
        wrong += got is None or got.matched_blocks != depth
    return wrong


def _sample(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, {"pod_key": POD, **labels}) or 0.0


def run(payloads: int, *, seed: int = 1, chunk: int = 4000, hang_after: float = 60.0,
        make_index=None) -> dict:
    """See the module docstring; ``payloads`` counts the malformed payloads. ``make_index``
    (given ``IndexConfig``) builds another index than memory's (the Redis one)."""
    traffic = Traffic(seed)
    pub = WirePublisher()
    config_index = IndexConfig(block_size=BLOCK)
    index = make_index(config_index) if make_index else MemoryPrefixIndex(config_index)
    registry = CollectorRegistry()
    config = ManagerConfig(enabled=True, subscriber=SubscriberConfig(idle_probe_interval=0))
    pod = Pod(POD, "127.0.0.1", "m", pub_port=pub.pub_port, router_port=pub.router_port)
    manager = KVEventManager(StaticPodProvider([pod]), index, config=config, registry=registry)
    hangs = checkpoints = checkpoints_wrong = 0
    t0 = time.monotonic()
    manager.start()
    try:
        # until the SUB's subscription takes effect, live batches are lost: the replay
        # that follows its connection finds them; wait for that before counting
        deadline = time.monotonic() + 20
        while _sample(registry, "kvcache_zmq_replay_requests_total") < 2 or \
                not manager.wait_quiescent(1):  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError("the subscriber never settled")
        while traffic.sent["malformed"] < payloads:
            for _ in range(chunk):
                traffic.push(pub)
            pub.flush()
            if not manager.wait_applied(POD, pub.next_seq - 1, hang_after):
                hangs += 1
                break
            checkpoints += 1
            if checkpoints % 25 == 0 and manager.wait_quiescent(hang_after):
                checkpoints_wrong += _wrong_chains(traffic.engine, index) > 0
        settled = manager.wait_quiescent(hang_after)
        hangs += not settled
        seconds = time.monotonic() - t0
        sub = manager.subscriber(POD)
        alive = sub is not None and sub.alive and manager.applier_alive
        wrong = _wrong_chains(traffic.engine, index)
        counted = {
            "decode_errors": _sample(registry, "kvcache_zmq_errors_total", error_type="decode"),
            "protocol_errors": _sample(registry, "kvcache_zmq_errors_total", error_type="protocol"),
            "invalid_events": _sample(registry, "kvcache_zmq_errors_total",
                                      error_type="invalid_event"),
            "stale_batches": _sample(registry, "kvcache_zmq_errors_total", error_type="stale_batch"),
            "events_processed": sum(_sample(registry, "kvcache_zmq_events_processed_total",
                                            event_type=t)
                                    for t in ("BlockStored", "BlockRemoved", "AllBlocksCleared")),
            "resyncs": sum(s.value for f in registry.collect() for s in f.samples
                           if s.name == "kvcache_zmq_resyncs_total"),
            "socket_errors": _sample(registry, "kvcache_zmq_errors_total", error_type="socket"),
        }  # fmt: skip
    finally:
        manager.stop()
        pub.close()
    index_blocks = index.stats()["blocks"]
    out = {
        "payloads": traffic.sent["malformed"],
        "valid_batches": traffic.sent["valid"],
        "invalid_event_batches": traffic.sent["invalid_event"],
        "malformed_frames": traffic.sent["frame"],
        "bogus_seq_frames": traffic.sent["bogus_seq"],
        "items": sum(traffic.sent.values()),
        "events_sent": traffic.events_sent,
        **{k: int(v) for k, v in counted.items()},
        "crashes": int(counted["socket_errors"] > 0 or not alive),
        "hangs": hangs,
        "index_blocks": index_blocks,
        "truth_blocks": len(traffic.engine.held),
        "chains_wrong": wrong,
        "checkpoints": checkpoints // 25,
        "checkpoints_wrong": checkpoints_wrong,
        "seconds": round(seconds, 1),
        "kinds": dict(sorted(traffic.kinds.items())),
    }
    out["ok"] = bool(
        out["crashes"] == 0 and out["hangs"] == 0 and out["resyncs"] == 0
        and out["decode_errors"] == out["payloads"]
        and out["protocol_errors"] == out["malformed_frames"]
        and out["invalid_events"] == out["invalid_event_batches"]
        and out["stale_batches"] == out["bogus_seq_frames"]
        and out["events_processed"] == out["events_sent"]
        and out["index_blocks"] == out["truth_blocks"] and wrong == 0 and checkpoints_wrong == 0
    )
    return out
