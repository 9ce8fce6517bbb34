"""Fuzzed KV event traffic: a wire publisher, a ground-truth engine, the mix of items.

- :class:`WirePublisher`: vLLM's wire (PUB ``[topic, seq, payload]``, ROUTER replay of a
  bounded buffer answered ``[b"", topic, seq, payload]`` then the ``-1`` end marker) on a
  thread of its own, which can also send raw frames that take no sequence number;
- :class:`Engine`: the ground truth - a prefix cache producing BlockStored chains (16-token
  blocks), leaf evictions and now and then an AllBlocksCleared;
- :class:`Traffic`: the stream of items: valid batches of the engine; malformed payloads
  (truncated, bit flips, msgpack markers, inserted bytes, huge lengths, deep nesting,
  random bytes, wrong types, trailing garbage, splices, tiny) - each one rejected by the
  codec, each one taking a sequence number as if the engine had sent it; batches with one
  inconsistent BlockStored among valid events; malformed live frames (a frame count other
  than 2 or 3, a seq frame that is not 8 bytes, a negative seq); well-formed frames with
  a seq the engine never sent (behind the stream, far ahead).
"""

from __future__ import annotations

import collections
import random
import time

import msgspec

from edgellm.comm.endpoints import Pub, Router
from edgellm.comm.loop import SocketThread
from edgellm.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventDecodeError,
    decode_batch,
    encode_batch,
)

BLOCK = 16
_END = (-1).to_bytes(8, "big", signed=True)


class WirePublisher(SocketThread):
    """vLLM's publisher wire on loopback, on a socket thread of its own; ``batch`` takes a
    seq, ``raw`` sends frames as they are."""

    def __init__(self, buffer: int = 100_000):
        super().__init__("fuzz-pub")
        self._buffer: collections.deque = collections.deque(maxlen=buffer)
        self.next_seq = 0
        self.start(10)

    def setup(self) -> None:
        # Nothing is dropped here (no high-water mark): the bench paces itself.
        self._pub = self.open(Pub, "tcp://127.0.0.1:*", sndhwm=0)
        self._router = self.open(Router, "tcp://127.0.0.1:*", sndhwm=0)
        self.pub_port = int(self._pub.last_endpoint.rsplit(":", 1)[1])
        self.router_port = int(self._router.last_endpoint.rsplit(":", 1)[1])
        self.add_reader(self._router, self._answer)

    def batch(self, payload: bytes) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self.call_soon(self._send_batch, seq, payload)
        return seq

    def raw(self, frames: list[bytes]) -> None:
        self.call_soon(lambda: self._pub.send_multipart(frames))

    def flush(self) -> None:
        """Return once everything handed over has been sent."""
        self.submit(lambda: None).result(60)

    def close(self) -> None:
        self.stop(10)

    def _send_batch(self, seq: int, payload: bytes) -> None:
        self._pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
        self._buffer.append((seq, payload))

    def _answer(self) -> None:
        for frames in self._router.drain_multipart(64):
            if len(frames) != 3:
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in self._buffer:
                if seq >= start:
                    self._router.send_multipart([identity, b"", b"", seq.to_bytes(8, "big"),
                                                 payload])  # fmt: skip
            self._router.send_multipart([identity, b"", b"", _END, b""])


class Engine:
    """What one engine's prefix cache holds: engine hash -> (parent, block tokens)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.held: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        self.children: collections.Counter = collections.Counter()
        self._next_hash = 1
        self._next_root = 1

    def store(self) -> BlockStored:
        rng = self.rng
        parent = rng.choice(list(self.held)) if self.held and rng.random() < 0.7 else None
        n = rng.randint(1, 3)
        tokens = [rng.randrange(1000, 120_000) for _ in range(n * BLOCK)]
        if parent is None:
            tokens[0] = self._next_root  # every chain's first block is its own
            self._next_root += 1
        hashes = []
        prev = parent
        for i in range(n):
            h = self._next_hash
            self._next_hash += 1
            self.held[h] = (prev, tuple(tokens[i * BLOCK:(i + 1) * BLOCK]))
            if prev is not None:
                self.children[prev] += 1
            hashes.append(h)
            prev = h
        return BlockStored(hashes, parent, tokens, BLOCK, None, "GPU", None)

    def evict(self) -> BlockRemoved:
        leaves = [h for h in self.held if not self.children[h]]
        gone = self.rng.sample(leaves, min(len(leaves), self.rng.randint(1, 3)))
        for h in gone:
            parent = self.held.pop(h)[0]
            if parent is not None:
                self.children[parent] -= 1
        return BlockRemoved(gone, "GPU")

    def clear(self) -> AllBlocksCleared:
        self.held.clear()
        self.children.clear()
        return AllBlocksCleared()

    def events(self) -> list:
        out = []
        for _ in range(self.rng.randint(1, 4)):
            r = self.rng.random()
            if r < 0.001:
                out.append(self.clear())
            elif r < 0.3 and self.held:
                out.append(self.evict())
            else:
                out.append(self.store())
        return out

    def prefix(self, h: int) -> tuple[list[int], int]:
        """The tokens from the root to block ``h``, and its depth in blocks."""
        chain = []
        while h is not None:
            parent, tokens = self.held[h]
            chain.append(tokens)
            h = parent
        return [t for block in reversed(chain) for t in block], len(chain)


_MARKERS = bytes([*range(0xC0, 0xE0), 0xFF, 0x90, 0x80, 0xA0])
_HUGE = (b"\xdd\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
         b"\xdb\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\xc6\x00\x10\x00\x00")  # fmt: skip
_BAD_VALUES = (None, "x", 1.5, -1, 2**64 - 1, [], {}, b"", b"\x00" * 65, True, [[[]]],
               {"type": "BlockStored"})  # fmt: skip
_RAW = msgspec.msgpack.Decoder()
_ENC = msgspec.msgpack.Encoder()


def _wrong_types(rng: random.Random, seed: bytes) -> bytes:
    obj = _RAW.decode(seed)
    node = obj
    for _ in range(rng.randint(1, 4)):  # walk down, then replace one element
        if isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if rng.random() < 0.5 or not isinstance(node[i], (list, dict)):
                node[i] = rng.choice(_BAD_VALUES)
                break
            node = node[i]
        elif isinstance(node, dict) and node:
            k = rng.choice(list(node))
            if rng.random() < 0.5 or not isinstance(node[k], (list, dict)):
                node[k] = rng.choice(_BAD_VALUES)
                break
            node = node[k]
    return _ENC.encode(obj)


def mutate(rng: random.Random, seed: bytes) -> tuple[str, bytes]:
    """One mutation of a valid payload (it may still decode: callers check)."""
    d = bytearray(seed)
    kind = rng.randrange(11)
    if kind == 0:
        return "truncated", bytes(d[:rng.randrange(len(d))])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
        return "bit_flips", bytes(d)
    if kind == 2:
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] = rng.choice(_MARKERS)
        return "markers", bytes(d)
    if kind == 3:
        p = rng.randrange(len(d) + 1)
        d[p:p] = rng.randbytes(rng.randint(1, 16))
        return "inserted", bytes(d)
    if kind == 4:
        p = rng.randrange(len(d))
        d[p:p + 1] = rng.choice(_HUGE)
        return "huge_length", bytes(d)
    if kind == 5:
        depth = rng.choice((10, 100, 1000, 10_000, 10_000, 100_000))
        unit = rng.choice((b"\x91", b"\x81\xa1a", b"\x92\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00"))
        return "deep_nesting", unit * depth + rng.choice((b"\xc0", b"", b"\x90"))
    if kind == 6:
        return "random_bytes", rng.randbytes(rng.randrange(300))
    if kind == 7:
        return "wrong_types", _wrong_types(rng, seed)
    if kind == 8:
        return "trailing_garbage", bytes(d) + rng.randbytes(rng.randint(1, 8))
    if kind == 9:
        other = rng.randbytes(40)
        return "spliced", bytes(d[:rng.randrange(len(d))]) + other[rng.randrange(len(other)):]
    return "tiny", bytes(d[:rng.randint(0, 2)])


def malformed_frames(rng: random.Random) -> tuple[str, list[bytes]]:
    kind = rng.randrange(5)
    if kind == 0:
        return "one_frame", [b""]
    if kind == 1:
        return "four_frames", [b"", (5).to_bytes(8, "big"), b"x", b"y"]
    if kind == 2:
        return "seq_not_8_bytes", [b"", b"\x00" * rng.choice((0, 1, 7, 9, 16)), b"\x90"]
    if kind == 3:
        return "negative_seq", [b"", (2**63 + rng.randrange(2**62)).to_bytes(8, "big"), b"\x90"]
    return "many_frames", [b""] * rng.choice((5, 6, 10))


class Traffic:
    """The mix of items (see the module docstring); counts what it made, by kind."""

    MIX = (("malformed", 0.80), ("valid", 0.10), ("invalid_event", 0.05), ("frame", 0.049),
           ("bogus_seq", 0.001))  # fmt: skip

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.engine = Engine(self.rng)
        self.seeds: collections.deque[bytes] = collections.deque(maxlen=64)
        self.sent: collections.Counter = collections.Counter()
        self.kinds: collections.Counter = collections.Counter()
        self.events_sent = 0
        self._kinds = [k for k, _ in self.MIX]
        self._weights = [w for _, w in self.MIX]

    def valid(self) -> bytes:
        events = self.engine.events()
        self.events_sent += len(events)
        payload = encode_batch(EventBatch(time.time(), events), self.rng.choice(("array", "map")))
        self.seeds.append(payload)
        return payload

    def malformed(self) -> tuple[str, bytes]:
        while True:
            kind, payload = mutate(self.rng, self.rng.choice(self.seeds))
            try:
                decode_batch(payload)
            except KVEventDecodeError:
                return kind, payload

    def invalid_event(self) -> bytes:
        events = self.engine.events()
        self.events_sent += len(events)  # the valid ones must all apply
        bad = BlockStored([2**62 + self.rng.randrange(2**40)], None,
                          [1] * self.rng.choice((1, 15, 17, 33)), BLOCK, None, "GPU", None)
        events.insert(self.rng.randrange(len(events) + 1), bad)
        return encode_batch(EventBatch(time.time(), events), self.rng.choice(("array", "map")))

    def push(self, pub: WirePublisher) -> None:
        """Send one item of the mix."""
        kind = self.rng.choices(self._kinds, self._weights)[0] if self.seeds else "valid"
        if kind == "bogus_seq" and pub.next_seq < 8:
            kind = "valid"
        self.sent[kind] += 1
        if kind == "valid":
            pub.batch(self.valid())
        elif kind == "malformed":
            sub_kind, payload = self.malformed()
            self.kinds[sub_kind] += 1
            pub.batch(payload)
        elif kind == "invalid_event":
            pub.batch(self.invalid_event())
        elif kind == "frame":
            sub_kind, frames = malformed_frames(self.rng)
            self.kinds[sub_kind] += 1
            pub.raw(frames)
        else:  # a batch the engine never sent, in bytes and in seq
            seq = pub.next_seq - self.rng.randint(2, 4) if self.rng.random() < 0.5 else \
                pub.next_seq + 1000 + self.rng.randrange(10**6)  # fmt: skip
            junk = EventBatch(time.time(), [BlockStored([2**63], None, [7] * BLOCK, BLOCK)])
            pub.raw([b"", seq.to_bytes(8, "big"), encode_batch(junk)])
