"""A simulated engine in its own process, for kill -9 tests.

    python engine_proc.py SEED [PUB_PORT ROUTER_PORT]

Binds a KVEventPublisher on 127.0.0.1 (free ports unless given), prints
``ports <pub> <router>``, then reads commands from stdin: ``publish N`` publishes N batches
of ``SimEngine(seed=SEED).random_events(3)`` and prints ``seq <last>``. The same seed in the
test process replays the same engine, so the test knows the ground truth.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvfakes.engine import SimEngine  # noqa: E402
from kvfakes.rig import start_publisher  # noqa: E402

from edgellm.kvevents.publisher import PublisherConfig  # noqa: E402


def main() -> int:
    seed = int(sys.argv[1])
    pub_port, router_port = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("*", "*")
    config = PublisherConfig(pub_endpoint=f"tcp://127.0.0.1:{pub_port}",
                             replay_endpoint=f"tcp://127.0.0.1:{router_port}")  # fmt: skip
    # The killed engine's ports may still be held by a lingering connection.
    publisher = start_publisher(config, bind_retry=20)
    engine = SimEngine("m", seed=seed)
    pub = publisher.pub_endpoint.rsplit(":", 1)[1]
    rep = publisher.replay_endpoint.rsplit(":", 1)[1]
    print(f"ports {pub} {rep}", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "publish":
            seq = -1
            for _ in range(int(arg)):
                seq = publisher.publish(engine.random_events(3))
            print(f"seq {seq}", flush=True)
    publisher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
