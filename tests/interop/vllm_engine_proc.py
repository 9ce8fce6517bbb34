"""vLLM's own ZmqEventPublisher (unchanged, see vllm_loader) in a process of its own, so a
test can kill -9 it.

    python vllm_engine_proc.py SEED PUB_ENDPOINT REPLAY_ENDPOINT

(vLLM binds a PUB endpoint only if it holds ``*`` or ``::``; ``tcp://[::1]:0`` binds a free
IPv6 loopback port, and the printed address can be bound again after a kill.)

Prints ``endpoints <pub> <replay>`` (the addresses bound), then reads ``publish N`` lines
from stdin: N batches, batch i holding one BlockStored of a new one-block chain whose 16
tokens are all ``SEED * 100_000 + i`` (i counts from 0 per process); answers ``seq <last>``
once vLLM's replay buffer holds the last one.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interop import vllm_loader  # noqa: E402

BLOCK = 16


def tokens(seed: int, i: int) -> list[int]:
    return [seed * 100_000 + i] * BLOCK


def main() -> int:
    seed, endpoint, replay = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if "[" in endpoint:  # vLLM binds endpoints holding "::" as given: IPv6 loopback
        zmq.Context.instance().setsockopt(zmq.IPV6, 1)
    kv = vllm_loader.load()
    deadline = time.monotonic() + 20
    while True:  # the killed engine's ports may still be held by a closing connection
        try:
            pub = kv.ZmqEventPublisher(data_parallel_rank=0, endpoint=endpoint,
                                       replay_endpoint=replay)  # fmt: skip
            break
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    last = [s.getsockopt(zmq.LAST_ENDPOINT).decode() for s in (pub._pub, pub._replay)]
    print("endpoints", *last, flush=True)
    n = 0
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd != "publish":
            continue
        for _ in range(int(arg)):
            toks = tokens(seed, n)
            digest = hashlib.sha256(repr(toks).encode()).digest()
            stored = kv.BlockStored(block_hashes=[digest], parent_block_hash=None, token_ids=toks,
                                    block_size=BLOCK, lora_id=None, medium="GPU", lora_name=None)
            pub.publish(kv.KVEventBatch(ts=time.time(), events=[stored]))
            n += 1
        while len(pub._buffer) < min(n, pub._buffer.maxlen):  # sent by vLLM's thread
            time.sleep(0.005)
        print("seq", n - 1, flush=True)
    pub.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
