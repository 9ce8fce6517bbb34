"""End-to-end ingest: engines' publishers in another process -> loopback TCP -> the
KV event manager (subscribers, apply thread) -> the in-memory prefix index (or another,
``make_index``: the Redis one, which the apply thread feeds in pipelined groups).

The publishers run in a child process, as engines are other processes: on a 2-core box
the engines' side takes one core and the manager the other.
"""

from __future__ import annotations

import multiprocessing as mp
import time

from edgellm.discovery.pod import Pod
from edgellm.discovery.provider import StaticPodProvider
from edgellm.kvevents.config import ManagerConfig, SubscriberConfig
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex
from edgellm.protocol.kv_events import EventBatch, encode_batch

WAIT_S = 120.0


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _engines(conn, pods: list[str]) -> None:
    """Child: one publisher per pod. The parent sends a list of ``(pod, payload)`` to load
(answered ``"loaded"``), then ``"go"`` to publish what was loaded (answered with the last
sequence number per pod), so the payloads' trip through the pipe is not timed."""
    from edgellm.kvevents.publisher import KVEventPublisher, PublisherConfig

    config = PublisherConfig(pub_endpoint="tcp://127.0.0.1:*",
                             replay_endpoint="tcp://127.0.0.1:*", max_queue=1_000_000)
    publishers = {pod: KVEventPublisher(config).start() for pod in pods}
    try:
        conn.send({pod: (_port(p.pub_endpoint), _port(p.replay_endpoint))
                   for pod, p in publishers.items()})
        loaded: list[tuple[str, bytes]] = []
        while True:
            message = conn.recv()
            if message == "stop":
                return
            if message != "go":
                loaded = message
                conn.send("loaded")
                continue
            last = {}
            for pod, payload in loaded:
                last[pod] = publishers[pod].publish_payload(payload)
            loaded = []
            conn.send(last)
    finally:
        for p in publishers.values():
            p.stop()


def end_to_end(payloads: list[tuple[str, bytes]], blocks: int,
               make_index=None) -> dict[str, object]:
    pods = sorted({pod for pod, _ in payloads})
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_engines, args=(child, pods), daemon=True)
    proc.start()
    index = make_index() if make_index is not None else MemoryPrefixIndex(
        IndexConfig(max_prefixes_per_context=10**8, max_blocks=10**8))
    try:
        if not parent.poll(WAIT_S):
            return {"skipped": "engine process did not start"}
        ports = parent.recv()
        provider = StaticPodProvider(
            Pod(pod, "127.0.0.1", "bench-model", pub_port=ports[pod][0], router_port=ports[pod][1])
            for pod in pods)
        config = ManagerConfig(enabled=True, subscriber=SubscriberConfig(queue_capacity=1 << 16))
        with KVEventManager(provider, index, config=config) as manager:
            # Warm up: every subscriber connected and applying.
            empty = encode_batch(EventBatch(time.time(), []))
            parent.send([(pod, empty) for pod in pods])
            parent.recv()
            parent.send("go")
            seqs = parent.recv()
            for pod, seq in seqs.items():
                if not manager.wait_applied(pod, seq, WAIT_S):
                    return {"skipped": f"{pod} did not connect"}
            # The payloads reach the engines before the clock starts: it runs from the
            # first publish to the last batch applied.
            parent.send(payloads)
            parent.recv()
            t0 = time.perf_counter()
            parent.send("go")
            seqs = parent.recv()
            for pod, seq in seqs.items():
                if not manager.wait_applied(pod, seq, WAIT_S):
                    return {"error": f"{pod} did not apply batch {seq} in {WAIT_S}s"}
            dt = time.perf_counter() - t0
            stats = index.stats()
        return {
            "blocks": blocks,
            "blocks_per_s": round(blocks / dt),
            "indexed_blocks": stats["blocks"],
            "unknown_parent": stats["unknown_parent"],
            "target_blocks_per_s": 500_000,
        }
    finally:
        parent.send("stop")
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        index.close()
