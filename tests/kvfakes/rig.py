"""Test rigs: a simulated engine behind a real publisher."""

from __future__ import annotations

import errno
import time

from edgellm.comm.errors import EndpointError
from edgellm.discovery.pod import Pod
from edgellm.kvevents.publisher import KVEventPublisher, PublisherConfig

from .engine import SimEngine
from .relay import DroppingRelay


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def start_publisher(config: PublisherConfig, bind_retry: float) -> KVEventPublisher:
    """Start a publisher; a restarted engine may find its ports still closing (zmq closes
    listeners on its I/O thread, after ``close()`` returned): retry for ``bind_retry`` s."""
    deadline = time.monotonic() + bind_retry
    while True:
        try:
            return KVEventPublisher(config).start()
        except EndpointError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class EngineRig:
    """A SimEngine publishing through a real KVEventPublisher on loopback."""

    def __init__(self, pod_key: str, model: str = "m", *, host: str = "127.0.0.1",
                 buffer_steps: int = 10_000, style: str = "array", seed: int = 0,
                 pub_port: int | None = None, router_port: int | None = None,
                 relay: bool = False, block_size: int = 4,
                 data_parallel_rank: int = 0, bind_retry: float = 20.0):  # fmt: skip
        self.pod_key = pod_key
        self.model = model
        self.host = host
        self.engine = SimEngine(model, seed=seed, block_size=block_size)
        addr = f"[{host}]" if ":" in host else host
        pub_ep = f"tcp://{addr}:{pub_port or '*'}"
        rep_ep = f"tcp://{addr}:{router_port or '*'}"
        config = PublisherConfig(pub_endpoint=pub_ep, replay_endpoint=rep_ep,
                                 buffer_steps=buffer_steps, style=style,
                                 data_parallel_rank=data_parallel_rank)  # fmt: skip
        self.publisher = start_publisher(config, bind_retry)
        self.relay = DroppingRelay(self.publisher.pub_endpoint).start() if relay else None
        self.last_seq: int | None = None

    @property
    def pub_port(self) -> int:
        return port_of(self.publisher.pub_endpoint)

    @property
    def router_port(self) -> int:
        return port_of(self.publisher.replay_endpoint)

    def pod(self, **overrides) -> Pod:
        live_port = self.relay.port if self.relay is not None else self.pub_port
        fields = dict(pod_key=self.pod_key, ip=self.host, model=self.model,
                      pub_port=live_port, router_port=self.router_port)  # fmt: skip
        fields.update(overrides)
        return Pod(**fields)

    def publish_events(self, events: list) -> int:
        seq = self.publisher.publish(events)
        self.engine.published(seq)
        self.last_seq = seq
        return seq

    def publish_random(self, batches: int, events_per_batch: int = 3) -> int:
        seq = -1
        for _ in range(batches):
            seq = self.publish_events(self.engine.random_events(events_per_batch))
        return seq

    def first_buffered_seq(self) -> int:
        return max(0, self.publisher.next_seq - self.publisher.config.buffer_steps)

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        self.publisher.stop()
