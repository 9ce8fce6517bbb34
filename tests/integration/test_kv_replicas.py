"""``kv-events`` replicas sharing one Redis: pods split by leases, taken over on a kill.

Real processes throughout: a redis-server of the test's own, two ``edgellm kv-events
--share-pods`` replicas, engines publishing through real publishers; one replica is killed
(SIGKILL) while the engines publish.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from edgellm.kvevents.leases import owner
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.redis_audit import dump
from edgellm.kvindex.redis_index import RedisPrefixIndex
from kvfakes.rig import EngineRig
from waits import wait_until
from redis_server import RedisServer, find_redis_server
from test_kv_events_command import _finish, _http, _start, _write_pods

pytestmark = pytest.mark.redis

PODS = [f"ns/engine-{k}" for k in range(6)]
LEASES = "{edgellm:kvi:leases}"


def _holders(client: redis.Redis) -> dict[str, str]:
    out = {}
    for pod in PODS:
        value = client.get(f"{LEASES}:l:{pod}")
        if value is not None:
            out[pod] = value.decode().split(" ")[0]
    return out


def _index_rows(url: str) -> dict[str, set[int]]:
    """Engine hashes each pod holds in the shared index."""
    with RedisPrefixIndex(IndexConfig(block_size=4), url=url) as index:
        rows: dict[str, set[int]] = {}
        for pods in dump(index).values():
            for pod, held in pods.items():
                rows.setdefault(pod, set()).update(held)
        return rows


def _metric(text: str, name: str, pod_key: str) -> float:
    """The sum of a series' samples for one pod (0 if it has none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'pod_key="{pod_key}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def server():
    if find_redis_server() is None:
        pytest.skip("redis-server binary not found (make test installs it)")
    with RedisServer() as made:
        yield made


def test_two_replicas_split_the_pods_and_one_takes_over_when_the_other_dies(tmp_path, server):
    # Rendezvous hashing is deterministic: these names split these pods between them.
    ids = [f"a-{uuid.uuid4().hex[:4]}", f"b-{uuid.uuid4().hex[:4]}"]
    while len({owner(p, ids) for p in PODS}) < 2:
        ids = [f"a-{uuid.uuid4().hex[:4]}", f"b-{uuid.uuid4().hex[:4]}"]
    rigs = [EngineRig(pod, seed=k + 1, block_size=4) for k, pod in enumerate(PODS)]
    client = redis.Redis.from_url(server.url)
    procs = []
    stop = threading.Event()
    try:
        pods_file = tmp_path / "pods.json"
        _write_pods(pods_file, rigs)
        for rid in ids:
            procs.append(_start(pods_file, "--redis-url", server.url, "--share-pods",
                                "--replica-id", rid))
        wait_until(lambda: _holders(client) == {p: owner(p, ids) for p in PODS}, 20,
                   "each pod leased to its replica")
        lock = threading.Lock()

        def publish() -> None:  # the engines keep working throughout
            while not stop.is_set():
                with lock:
                    for rig in rigs:
                        rig.publish_random(1)
                time.sleep(0.01)

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        time.sleep(2.0)
        victim, survivor = procs[0], procs[1]
        victim[0].kill()
        killed_at = time.monotonic()
        victims = [r for r in rigs if owner(r.pod_key, ids) == ids[0]]
        with RedisPrefixIndex(IndexConfig(block_size=4), url=server.url) as reader:
            # (Read before the survivor's first write: the victim's last commits.)
            marks = {r.pod_key: reader.committed(("m", -1), r.pod_key) for r in victims}
        assert all(marks.values()), marks
        wait_until(lambda: set(_holders(client).values()) == {ids[1]}
                   and len(_holders(client)) == len(PODS), 10, "the survivor holding every pod")
        took = time.monotonic() - killed_at
        assert took <= 5.0, f"takeover took {took:.1f}s"
        time.sleep(1.0)  # the survivor now follows every pod while they publish
        stop.set()
        publisher.join(10)
        truth = {rig.pod_key: {h for _, h in rig.engine.truth()} for rig in rigs}
        wait_until(lambda: _index_rows(server.url) == truth, 30,
                   "the index equal to the engines' truth")
        code, metrics = _http(survivor[1] + "/metrics")
        assert code == 200
        text = metrics.decode()
        assert f"kvevents_lease_pods_held {float(len(PODS))}" in text
        assert 'error_type="fenced"' not in text
        # The victim's pods were resumed after their committed batch, not replayed from 0
        # (nor cleared: a clear and a full replay would look the same in the index): the
        # survivor replayed at most what followed the victim's last commit.
        for rig in victims:
            replayed = _metric(text, "kvcache_zmq_replayed_batches_total", rig.pod_key)
            committed = marks[rig.pod_key][0]
            assert replayed <= rig.last_seq - committed, (rig.pod_key, replayed, committed)
            assert _metric(text, "kvcache_zmq_resyncs_total", rig.pod_key) == 0
    finally:
        stop.set()
        for proc, _ in procs:
            _finish(proc)
        for rig in rigs:
            rig.stop()
        client.close()


def test_a_stale_holder_is_fenced(server):
    # A writer whose lease epoch is below the pod's fence changes nothing.
    from edgellm.kvindex.api import FENCED, STORED, IndexBatch

    ns = f"t:{uuid.uuid4().hex}"
    ctx = ("m", -1)
    t = list(range(300, 316))
    with RedisPrefixIndex(IndexConfig(block_size=4), url=server.url, namespace=ns) as old, \
            RedisPrefixIndex(IndexConfig(block_size=4), url=server.url, namespace=ns) as new:
        first = IndexBatch(ctx, "p", [(STORED, [1, 2], None, t[:8], 4)], seq=0, epoch=1,
                           digest=11)
        assert old.apply_batches([first])[0][0].stored == 2
        taken = new.take_over(ctx, "p", 2)
        assert (taken.seq, taken.digest, taken.fenced_by) == (0, 11, None)
        late = IndexBatch(ctx, "p", [(STORED, [3], 2, t[8:12], 4)], seq=1, epoch=1, digest=12)
        assert old.apply_batches([late]) == [FENCED]
        assert new.committed(ctx, "p") == (0, 11)
        assert new.match_prefix(ctx, t)["p"].matched_blocks == 2
        resumed = IndexBatch(ctx, "p", [(STORED, [3], 2, t[8:12], 4)], seq=1, epoch=2,
                             digest=12)
        assert new.apply_batches([resumed])[0][0].stored == 1
        assert old.take_over(ctx, "p", 1).fenced_by == 2


def test_leases_split_rebalance_and_lapse(server):
    # Lease rounds driven by hand: two keepers split the pods, a third joining takes its
    # share from them (released, then claimed), and a keeper that stops renewing loses
    # its pods to the others once its lease and membership lapse.
    from edgellm.discovery.pod import Pod
    from edgellm.kvevents.leases import LeaseConfig, PodLeases

    client = redis.Redis.from_url(server.url)
    pods = [Pod(pod_key=f"ns/p{k}", ip="127.0.0.1", model="m") for k in range(12)]
    ns = f"t{uuid.uuid4().hex[:6]}"
    held: dict[str, dict[str, int]] = {}

    def keeper(rid: str) -> PodLeases:
        held[rid] = {}
        leases = PodLeases(client, LeaseConfig(replica_id=rid, namespace=ns, ttl=0.6,
                                               renew_interval=0.2),
                           on_gain=lambda pod, epoch: held[rid].__setitem__(pod.pod_key, epoch),
                           on_lose=lambda key: held[rid].pop(key))
        for pod in pods:
            leases.track(pod)
        return leases

    def rounds(keepers, n=2):
        for _ in range(n):
            for k in keepers:
                k.round()

    a, b = keeper("a"), keeper("b")
    rounds([a, b])
    for rid in "ab":
        assert set(held[rid]) == {p.pod_key for p in pods if owner(p.pod_key, ["a", "b"]) == rid}
    c = keeper("c")
    rounds([a, b, c], 3)
    owners = {p.pod_key: owner(p.pod_key, ["a", "b", "c"]) for p in pods}
    for rid in "abc":
        assert set(held[rid]) == {k for k, o in owners.items() if o == rid}
    epochs_before = dict(held["c"])
    time.sleep(0.8)  # c stops renewing: its leases and membership lapse
    rounds([a, b])
    assert len(held["a"]) + len(held["b"]) == len(pods)
    for key, epoch in epochs_before.items():  # taken over with a higher epoch (fencing)
        assert held["a"].get(key, held["b"].get(key)) > epoch
    client.close()


def test_a_parent_restored_elsewhere_is_rehashed_in_order(server):
    # Writer A remembers chain tails; another writer re-stores A's tail under other tokens.
    # A's next group chains on the stale guess: the script stops there, A's later batches
    # of that pod wait (stalled) and everything is resent in order after a rehash.
    from edgellm.kvindex.api import STORED, IndexBatch

    ns = f"t:{uuid.uuid4().hex}"
    ctx = ("m", -1)
    t = list(range(300, 324))
    other_tokens = list(range(900, 904))
    config = IndexConfig(block_size=4)
    with RedisPrefixIndex(config, url=server.url, namespace=ns) as a, \
            RedisPrefixIndex(config, url=server.url, namespace=ns) as b, \
            RedisPrefixIndex(config, url=server.url, namespace=ns) as reader:
        a.apply_batches([IndexBatch(ctx, "p", [(STORED, [1, 2], None, t[:8], 4)], seq=0)])
        b.process_block_stored(ctx, "p", [2], 1, other_tokens, 4)  # 2 now ends other tokens
        results = a.apply_batches([
            IndexBatch(ctx, "p", [(STORED, [3], 2, t[8:12], 4)], seq=1),
            IndexBatch(ctx, "p", [(STORED, [4], 3, t[12:16], 4)], seq=2)])
        assert [r[0].stored for r in results] == [1, 1]
        prompt = t[:4] + other_tokens + t[8:16]
        assert reader.match_prefix(ctx, prompt)["p"].matched_blocks == 4
        assert a.committed(ctx, "p")[0] == 2


def test_share_pods_needs_redis(tmp_path):
    import subprocess
    import sys

    pods_file = tmp_path / "pods.json"
    pods_file.write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "edgellm.cli", "kv-events", "--pods",
                           str(pods_file), "--http-port", "0", "--share-pods"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--share-pods needs --redis-url" in proc.stderr
