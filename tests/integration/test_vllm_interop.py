"""vLLM's own KV event publisher, unchanged, against our consumer side.

``ZmqEventPublisher`` and the ``KVEventBatch``/``BlockStored``/``BlockRemoved``/
``AllBlocksCleared`` structs are vLLM's real code (``tests/interop/vllm_loader.py`` loads
it from ``.cache/vllm``, fetched by ``scripts/fetch_vllm_kv_events.py``; only four small
helper modules are stand-ins). Each simulated engine keeps a prefix cache the way vLLM's
block pool does (sha256 block hashes chained from a random root, 16-token blocks,
``parent_block_hash`` of the block before the first one, ``None`` for a root; vLLM 0.33
publishes 32-byte sha256 digests or, as with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, their
low 64 bits; vLLM 0.10 publishes Python's signed ``hash()`` values, in array-like events)
and is the ground truth of which token prefixes each pod holds.

(a) ``edgellm kv-events`` as a subprocess, for vLLM 0.33.0 and 0.10.0: ``POST /v1/score``
    equals the ground truth.
(b) KVEventManager + MemoryPrefixIndex in process: a late subscriber is filled by vLLM's
    replay ROUTER, then follows live; a restarted engine (a new publisher on the same
    address, sequence from 0, empty cache) has its stale entries dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import msgspec
import pytest
import zmq
from prometheus_client import CollectorRegistry

from interop import vllm_loader
from waits import wait_until

from edgellm.discovery.pod import Pod
from edgellm.discovery.provider import StaticPodProvider
from edgellm.kvevents.config import ManagerConfig
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.memory import MemoryPrefixIndex

BLOCK = 16
MODEL = "m"
_U64_MASK = (1 << 64) - 1


# --- an engine's prefix cache, published through vLLM's publisher ---------------------


class VllmEngine:
    """A vLLM-like prefix cache whose events go out through vLLM's real ZmqEventPublisher.

    ``hashes``: ``"digest"`` / ``"u64"`` (vLLM 0.33, bytes / low 64 bits) or ``"py_hash"``
    (vLLM 0.10).

    ``held`` maps each token prefix (a multiple of BLOCK tokens) the engine holds to its
    block hash; it is kept prefix-closed (only leaves are evicted), as vLLM's eviction of
    a request's tail blocks first does.
    """

    def __init__(self, kv, endpoint: str, replay_endpoint: str, *, hashes: str):
        self.kv = kv
        self.publisher = _new_publisher(kv, endpoint, replay_endpoint)
        # The addresses vLLM's sockets actually bound (port 0 -> the OS's choice).
        self.endpoint = _last_endpoint(self.publisher._pub)
        self.replay_endpoint = _last_endpoint(self.publisher._replay)
        self.hashes = hashes
        # vLLM's NONE_HASH: a random root per engine (bytes since 0.11, an int before)
        self.none_hash = os.urandom(32)
        if hashes == "py_hash":
            self.none_hash = int.from_bytes(self.none_hash, "big")
        self.held: dict[tuple[int, ...], bytes | int] = {}
        self.children: Counter[tuple[int, ...]] = Counter()
        self.next_seq = 0

    def _external(self, block_hash: bytes | int):
        # vLLM's maybe_convert_block_hash (0.33: digests, or their low 64 bits)
        if self.hashes == "u64":
            return int.from_bytes(block_hash, "big") & _U64_MASK
        return block_hash

    def _chain(self, parent: bytes | int, tokens: tuple[int, ...]) -> bytes | int:
        if self.hashes == "py_hash":  # vLLM 0.10's default: Python's hash(), signed 64-bit
            return hash((parent, tokens, None))
        # vLLM 0.33's "sha256" prefix hash: sha256 of the pickled (parent, tokens, extra_keys)
        return hashlib.sha256(pickle.dumps((parent, tokens, None), protocol=5)).digest()

    def _event(self, cls, **fields):
        """One of vLLM's event structs, with the fields this vLLM version has."""
        return cls(**{k: v for k, v in fields.items() if k in cls.__struct_fields__})

    def store(self, doc: list[int], n_blocks: int):
        """Cache the first ``n_blocks`` of ``doc``: a BlockStored of the missing ones."""
        first = 0
        while first < n_blocks and tuple(doc[: BLOCK * (first + 1)]) in self.held:
            first += 1
        if first == n_blocks:
            return None  # a full prefix cache hit stores nothing
        parent = self.held[tuple(doc[: BLOCK * first])] if first else None
        chained, hashes = parent if parent is not None else self.none_hash, []
        for i in range(first, n_blocks):
            tokens = tuple(doc[BLOCK * i : BLOCK * (i + 1)])
            chained = self._chain(chained, tokens)
            prefix = tuple(doc[: BLOCK * (i + 1)])
            self.held[prefix] = chained
            if i:
                self.children[prefix[:-BLOCK]] += 1
            hashes.append(self._external(chained))
        return self._event(
            self.kv.BlockStored,
            block_hashes=hashes,
            parent_block_hash=None if parent is None else self._external(parent),
            token_ids=list(doc[BLOCK * first : BLOCK * n_blocks]),
            block_size=BLOCK, lora_id=None, medium="GPU", lora_name=None,
        )  # fmt: skip

    def evict(self, rng: random.Random, k: int):
        """Evict up to ``k`` leaf blocks: a BlockRemoved."""
        leaves = sorted(p for p in self.held if not self.children[p])
        gone = rng.sample(leaves, min(k, len(leaves)))
        if not gone:
            return None
        hashes = [self._external(self.held.pop(prefix)) for prefix in gone]
        for prefix in gone:
            if len(prefix) > BLOCK:
                self.children[prefix[:-BLOCK]] -= 1
        return self._event(self.kv.BlockRemoved, block_hashes=hashes, medium="GPU")

    def clear(self):
        self.held.clear()
        self.children.clear()
        return self.kv.AllBlocksCleared()

    def publish(self, events: list) -> int:
        self.publisher.publish(self.kv.KVEventBatch(ts=time.time(), events=events))
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq

    def matched(self, prompt: list[int]) -> int:
        n = 0
        while BLOCK * (n + 1) <= len(prompt) and tuple(prompt[: BLOCK * (n + 1)]) in self.held:
            n += 1
        return n

    def shutdown(self) -> None:
        self.publisher.shutdown()


def _new_publisher(kv, endpoint: str, replay_endpoint: str):
    """vLLM's publisher. A restarted engine may find its old ports still closing (zmq
    releases them on its I/O thread): wait until both can be bound, so vLLM's constructor
    (which would leave its PUB bound if the ROUTER failed) runs once."""
    for ep in (endpoint, replay_endpoint):
        host, _, port = ep.removeprefix("tcp://").rpartition(":")
        if port != "0":
            wait_until(lambda: _port_free(host.strip("[]"), int(port)), 20, f"{ep} free again")
    return kv.ZmqEventPublisher(data_parallel_rank=0, endpoint=endpoint,
                                replay_endpoint=replay_endpoint)  # fmt: skip


def _last_endpoint(sock: zmq.Socket) -> str:
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as zmq's listeners do
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _buffered_through(replay_endpoint: str, seq: int, timeout: float = 20.0) -> None:
    """Wait until vLLM's replay ROUTER holds batch ``seq`` (so it has been published),
    asking it over its own wire protocol: ``[b"", start_seq]`` -> batches, then ``-1``."""
    ctx = zmq.Context.instance()
    deadline = time.monotonic() + timeout
    while True:
        with ctx.socket(zmq.DEALER) as dealer:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.IPV6, 1)
            dealer.connect(replay_endpoint)
            dealer.send_multipart([b"", seq.to_bytes(8, "big")])
            seen = set()
            while dealer.poll(max(0.0, deadline - time.monotonic()) * 1000):
                _, _, seq_bytes, _ = dealer.recv_multipart()
                got = int.from_bytes(seq_bytes, "big", signed=True)
                if got == -1:
                    break
                seen.add(got)
            if seq in seen:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"vLLM's replay buffer never held batch {seq}")
        time.sleep(0.02)


# --- the recorded stream ----------------------------------------------------------------


def _documents(seed: int) -> list[list[int]]:
    """Prompts sharing system prefixes (2-4 blocks), each with its own 1-5 block tail."""
    rng = random.Random(seed)
    systems = [[rng.randrange(50_000) for _ in range(BLOCK * rng.randint(2, 4))] for _ in range(4)]
    return [rng.choice(systems) + [rng.randrange(50_000) for _ in range(BLOCK * rng.randint(1, 5))]
            for _ in range(12)]  # fmt: skip


def _play(engine: VllmEngine, rng: random.Random, docs, batches: int, *,
          clear_at: int | None = None) -> int:  # fmt: skip
    """Publish ``batches`` batches of 1-3 events (stores, evictions; an AllBlocksCleared
    first in batch ``clear_at``); returns the last sequence number."""
    seq = -1
    for b in range(batches):
        events = [engine.clear()] if b == clear_at else []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.25:
                ev = engine.evict(rng, rng.randint(1, 3))
            else:
                doc = rng.choice(docs)
                ev = engine.store(doc, rng.randint(1, len(doc) // BLOCK))
            if ev is not None:
                events.append(ev)
        seq = engine.publish(events)
    return seq


def _probes(docs, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    cut = [d[: BLOCK * rng.randint(1, len(d) // BLOCK)] + [1, 2, 3] for d in docs]
    unrelated = [rng.randrange(50_000) for _ in range(BLOCK * 3)]
    return [*docs, *cut, unrelated]


def _truth(engines: dict[str, VllmEngine], prompt: list[int]) -> dict[str, tuple[int, float]]:
    blocks = len(prompt) // BLOCK
    out = {}
    for pod_key, engine in engines.items():
        n = engine.matched(prompt)
        if n:
            out[pod_key] = (n, 100.0 * n / blocks)
    return out


def _same(got: dict[str, tuple[int, float]], want: dict[str, tuple[int, float]]) -> bool:
    return got.keys() == want.keys() and all(
        got[k][0] == want[k][0] and math.isclose(got[k][1], want[k][1]) for k in want
    )


def _wait_truth(answer, engines, probes, timeout: float = 30.0) -> None:
    """Wait until ``answer(prompt)`` equals the ground truth for every probe."""
    last: list = []

    def check() -> bool:
        for prompt in probes:
            got, want = answer(prompt), _truth(engines, prompt)
            if not _same(got, want):
                last[:] = [len(prompt) // BLOCK, got, want]
                return False
        return True

    try:
        wait_until(check, timeout, "the index == ground truth")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last mismatch (prompt blocks, got, want): {last}") from None


def _assert_nontrivial(engines, probes) -> None:
    """The ground truth has matches on every pod and pods that differ (else a test that
    compares against it could not fail)."""
    truths = [_truth(engines, p) for p in probes]
    for pod_key in engines:
        assert any(pod_key in t for t in truths), f"{pod_key} holds none of the probes"
    assert any(len({v[0] for v in t.values()} | ({0} if len(t) < len(engines) else set())) > 1
               for t in truths), "every probe matches all pods alike"  # fmt: skip


@pytest.fixture
def vllm_version() -> str:
    return vllm_loader.CURRENT


@pytest.fixture
def kv(vllm_version):
    """vLLM's own kv_events module of ``vllm_version``; skips if it was not fetched."""
    reason = vllm_loader.missing_reason(vllm_version)
    if reason:
        pytest.skip(reason)
    return vllm_loader.load(vllm_version)


@pytest.fixture
def engines_factory(kv):
    made: list[VllmEngine] = []

    def make(*args, **kwargs) -> VllmEngine:
        engine = VllmEngine(kv, *args, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _host(endpoint: str) -> str:
    return endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")


# --- (a) edgellm kv-events ----------------------------------------------------------------


def _score(base: str, prompt: list[int]) -> dict[str, tuple[int, float]]:
    body = json.dumps({"model": MODEL, "token_ids": prompt}).encode()
    req = urllib.request.Request(base + "/v1/score", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        pods = json.loads(resp.read())["pods"]
    return {k: (v["matched_blocks"], v["percent"]) for k, v in pods.items() if v["matched_blocks"]}


@pytest.mark.parametrize("vllm_version", [vllm_loader.CURRENT, vllm_loader.OLD])
def test_kv_events_command_index_equals_what_vllm_publishers_hold(
    vllm_version, engines_factory, tmp_path, monkeypatch, request
):
    if vllm_version == vllm_loader.OLD:
        # 0.10 binds what it is given when it holds "*" or "::": IPv6 loopback, port 0
        request.getfixturevalue("ipv6_loopback")
        endpoint, hashes = "tcp://[::1]:0", ("py_hash", "py_hash")
    else:
        monkeypatch.delenv("VLLM_HOST_IP", raising=False)  # vLLM binds tcp://*:0 on 127.0.0.1
        endpoint, hashes = "tcp://*:0", ("digest", "u64")
    engines = {
        f"vllm/{h}-{i}": engines_factory(endpoint, endpoint, hashes=h) for i, h in enumerate(hashes)
    }
    pods_file = tmp_path / "pods.json"
    pods_file.write_text(json.dumps([
        {"pod_key": k, "ip": _host(e.endpoint), "model": MODEL, "pub_port": _port(e.endpoint),
         "router_port": _port(e.replay_endpoint)} for k, e in engines.items()
    ]))  # fmt: skip
    docs = _documents(1)
    # half of the stream before the command starts (it must replay it), half after
    for i, engine in enumerate(engines.values()):
        _play(engine, random.Random(10 + i), docs, 30, clear_at=10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm.cli", "kv-events", "--pods", str(pods_file),
         "--http-port", "0", "--block-size", str(BLOCK), "--poll-interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "listening on http://" in line, (
            proc.stderr.read() if proc.poll() is not None else line
        )
        base = line.strip().rsplit(" ", 1)[1]
        for i, engine in enumerate(engines.values()):
            _play(engine, random.Random(20 + i), docs, 30)
        probes = _probes(docs, 2)
        _assert_nontrivial(engines, probes)
        _wait_truth(lambda p: _score(base, p), engines, probes)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


# --- (b) in process: late start, replay, engine restart -------------------------------


def _sample_sum(registry: CollectorRegistry, name: str, pod_key: str) -> float:
    return sum(s.value for metric in registry.collect() for s in metric.samples
               if s.name == name and s.labels.get("pod_key") == pod_key)  # fmt: skip


@pytest.fixture
def ipv6_loopback(monkeypatch):
    """vLLM binds ``tcp://*:0`` on ``VLLM_HOST_IP`` (here ::1) and ``[::1]:port`` endpoints
    as given: the shared context enables IPv6 for them (loopback only, no wildcard)."""
    monkeypatch.setenv("VLLM_HOST_IP", "::1")
    ctx = zmq.Context.instance()
    before = ctx.sockopts.get(zmq.IPV6)  # the context's defaults for new sockets
    ctx.setsockopt(zmq.IPV6, 1)
    yield
    if before is None:
        ctx.sockopts.pop(zmq.IPV6, None)
    else:
        ctx.setsockopt(zmq.IPV6, before)


def test_late_subscriber_replays_then_a_restarted_vllm_engine_is_followed(
    engines_factory, ipv6_loopback
):
    engines = {
        "vllm/a": engines_factory("tcp://*:0", "tcp://*:0", hashes="digest"),
        "vllm/b": engines_factory("tcp://*:0", "tcp://*:0", hashes="u64"),
    }
    docs = _documents(3)
    probes = _probes(docs, 4)
    rngs = {k: random.Random(30 + i) for i, k in enumerate(engines)}
    for key, engine in engines.items():
        last = _play(engine, rngs[key], docs, 40, clear_at=12)
        _buffered_through(engine.replay_endpoint, last)  # all published before we subscribe

    index = MemoryPrefixIndex(IndexConfig(block_size=BLOCK))
    provider = StaticPodProvider([
        Pod(pod_key=k, ip=_host(e.endpoint), model=MODEL, pub_port=_port(e.endpoint),
            router_port=_port(e.replay_endpoint)) for k, e in engines.items()
    ])  # fmt: skip
    registry = CollectorRegistry()
    manager = KVEventManager(provider, index, config=ManagerConfig(enabled=True), registry=registry)

    def answer(prompt):
        matches = index.match_prefix((MODEL, -1), prompt)
        return {k: (m.matched_blocks, m.percent) for k, m in matches.items() if m.matched_blocks}

    with manager.start():
        # late start: everything so far comes from vLLM's replay ROUTER
        for key in engines:
            assert manager.wait_applied(key, 39, timeout=30), f"{key} did not replay batch 39"
        _assert_nontrivial(engines, probes)
        _wait_truth(answer, engines, probes)
        for key in engines:
            assert _sample_sum(registry, "kvcache_zmq_replay_requests_total", key) >= 1
            assert _sample_sum(registry, "kvcache_zmq_replayed_batches_total", key) >= 40

        # then live
        for key, engine in engines.items():
            last = _play(engine, rngs[key], docs, 20)
            assert manager.wait_applied(key, last, timeout=30), f"{key} did not apply batch {last}"
        _wait_truth(answer, engines, probes)

        # engine a restarts: same address, sequence from 0, an empty cache, a new hash root
        old = engines["vllm/a"]
        before = [_truth(engines, p).get("vllm/a", (0, 0.0))[0] for p in probes]
        resyncs = _sample_sum(registry, "kvcache_zmq_resyncs_total", "vllm/a")
        old.shutdown()
        new = engines_factory(old.endpoint, old.replay_endpoint, hashes="digest")
        engines["vllm/a"] = new
        _play(new, random.Random(50), docs, 8)
        after = [_truth(engines, p).get("vllm/a", (0, 0.0))[0] for p in probes]
        assert any(b > a for b, a in zip(before, after)), "the restart leaves nothing stale"
        _wait_truth(answer, engines, probes)
        assert _sample_sum(registry, "kvcache_zmq_resyncs_total", "vllm/a") > resyncs


# --- our encoder, read by vLLM's own structs --------------------------------------------


@pytest.mark.parametrize("vllm_version, style", [(vllm_loader.CURRENT, "map"),
                                                 (vllm_loader.OLD, "array")])  # fmt: skip
def test_our_encoding_decodes_with_vllms_own_structs(kv, style):
    """Our publisher's ``style`` is the wire form of that vLLM release: vLLM's typed
    decoder reads it back as the same events (hashes, parents, tokens, rank)."""
    from edgellm.protocol.kv_events import (
        AllBlocksCleared,
        BlockRemoved,
        BlockStored,
        EventBatch,
        encode_batch,
    )

    tokens = list(range(2 * BLOCK))
    ours = EventBatch(1.5, [BlockStored([2**63 + 5, 7], 3, tokens, BLOCK, None, "GPU", None),
                            BlockRemoved([7], "GPU"), AllBlocksCleared()], 1)  # fmt: skip
    theirs = msgspec.msgpack.decode(encode_batch(ours, style), type=kv.KVEventBatch)
    stored, removed, cleared = theirs.events
    assert (theirs.ts, theirs.data_parallel_rank) == (1.5, 1)
    assert (type(stored), type(removed), type(cleared)) == (
        kv.BlockStored, kv.BlockRemoved, kv.AllBlocksCleared)  # fmt: skip
    assert (stored.block_hashes, stored.parent_block_hash, stored.token_ids, stored.block_size,
            stored.lora_id) == ([2**63 + 5, 7], 3, tokens, BLOCK, None)  # fmt: skip
    assert removed.block_hashes == [7]
