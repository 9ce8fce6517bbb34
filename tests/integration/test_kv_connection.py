"""The connection series follow the publisher's TCP connection: vLLM's own publisher in a
process of its own, killed with SIGKILL, left down, restarted on the same ports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from interop import vllm_loader
from waits import wait_until

from edgellm.discovery.pod import Pod
from edgellm.discovery.provider import StaticPodProvider
from edgellm.kvevents.config import ManagerConfig, SubscriberConfig
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex

SCRIPT = Path(__file__).resolve().parents[1] / "interop" / "vllm_engine_proc.py"
BLOCK = 16


class VllmProcess:
    def __init__(self, seed: int, pub: str = "tcp://[::1]:0", replay: str = "tcp://[::1]:0"):
        self.seed = seed
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), str(seed), pub, replay],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["endpoints"], line
        self.pub, self.replay = line[1], line[2]
        self.published = 0

    def publish(self, n: int) -> int:
        self.proc.stdin.write(f"publish {n}\n")
        self.proc.stdin.flush()
        self.published += n
        return int(self.proc.stdout.readline().split()[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdin.close()
        self.proc.stdout.close()

    def prompts(self) -> list[list[int]]:
        return [[self.seed * 100_000 + i] * BLOCK for i in range(self.published)]


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@pytest.fixture
def kv():
    reason = vllm_loader.missing_reason()
    if reason:
        pytest.skip(reason)


def test_sigkill_down_and_restart_drive_the_connection_series(kv):
    engine = VllmProcess(seed=1)
    index = MemoryPrefixIndex(IndexConfig(block_size=BLOCK))
    pod = Pod("ns/k", "::1", "m", pub_port=_port(engine.pub), router_port=_port(engine.replay))
    registry = CollectorRegistry()
    # A replay timeout far beyond the waits below: the status must come from the socket,
    # not from a replay going unanswered.
    config = ManagerConfig(enabled=True, subscriber=SubscriberConfig(idle_probe_interval=0.5,
                                                                     replay_timeout=120))
    manager = KVEventManager(StaticPodProvider([pod]), index, config=config, registry=registry)

    def metric(name: str) -> float:
        return registry.get_sample_value(f"kvcache_zmq_{name}", {"pod_key": "ns/k"}) or 0.0

    def holds(prompts) -> bool:
        return all(index.match_prefix(("m", -1), p).get("ns/k") for p in prompts)

    new = None
    try:
        with manager.start():
            engine.publish(5)
            wait_until(lambda: holds(engine.prompts()), 20, "the first engine's blocks")
            wait_until(lambda: metric("connection_status") == 1, 20, "connected")
            assert (metric("connections_total"), metric("disconnections_total")) == (1, 0)

            old_prompts = engine.prompts()
            engine.kill()  # SIGKILL: no goodbye on the wire, the kernel closes the socket
            wait_until(lambda: metric("connection_status") == 0, 20, "status 0 once it is gone")
            assert metric("disconnections_total") == 1
            wait_until(lambda: metric("reconnect_attempts_total") >= 2, 20, "connect retries")
            assert metric("connection_status") == 0  # still down

            new = VllmProcess(seed=2, pub=engine.pub, replay=engine.replay)
            new.publish(3)
            wait_until(lambda: holds(new.prompts()) and not any(
                index.match_prefix(("m", -1), p) for p in old_prompts),
                20, "the new engine followed, the dead one's blocks gone")  # fmt: skip
            wait_until(lambda: metric("connection_status") == 1, 20, "connected again")
            assert (metric("connections_total"), metric("disconnections_total")) == (2, 1)
            assert registry.get_sample_value("kvcache_zmq_resyncs_total",
                                             {"pod_key": "ns/k", "reason": "restart"}) == 1
    finally:
        engine.kill()
        if new is not None:
            new.kill()
