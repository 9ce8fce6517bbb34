"""``edgellm kv-events`` end to end: a real subprocess, a pods file, real publishers, HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kvfakes.rig import EngineRig  # noqa: E402
from waits import wait_until  # noqa: E402

BLOCK = 4


def _http(url: str, body: bytes | None = None, method: str | None = None):
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _score(base: str, tokens, model="m", **extra):
    body = json.dumps({"model": model, "token_ids": tokens, **extra}).encode()
    code, data = _http(base + "/v1/score", body)
    assert code == 200, data
    return json.loads(data)["pods"]


def _write_pods(path: Path, rigs) -> None:
    pods = [{"pod_key": r.pod_key, "ip": r.host, "model": r.model, "pub_port": r.pub_port,
             "router_port": r.router_port} for r in rigs]  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(pods))
    os.replace(tmp, path)


@pytest.fixture
def rigs():
    made = [EngineRig("ns/a", seed=1, block_size=BLOCK), EngineRig("ns/b", seed=2, block_size=BLOCK)]
    yield made
    for r in made:
        r.stop()


def _start(pods_file: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm.cli", "kv-events", "--pods", str(pods_file),
         "--http-port", "0", "--block-size", str(BLOCK), "--poll-interval", "0.1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert "listening on http://" in line, proc.stderr.read() if proc.poll() is not None else line
    return proc, line.strip().rsplit(" ", 1)[1]


def _finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


@pytest.fixture
def command(tmp_path, rigs):
    pods_file = tmp_path / "pods.json"
    _write_pods(pods_file, rigs)
    proc, base = _start(pods_file)
    yield proc, base, pods_file
    _finish(proc)


def test_score_metrics_health_and_pod_file_changes(command, rigs):
    proc, base, pods_file = command
    a, b = rigs
    chain = a.engine.store_chain(3)
    a.publish_events([chain])
    tail = b.engine.store_chain(1, tokens=chain.token_ids[:BLOCK])  # b holds the first block only
    b.publish_events([tail])
    prompt = list(chain.token_ids) + [7, 7]  # a partial trailing block is ignored

    def scored():
        return _score(base, prompt) == {
            "ns/a": {"matched_blocks": 3, "percent": 100.0},
            "ns/b": {"matched_blocks": 1, "percent": 100.0 / 3},
        }

    wait_until(scored, 30, "both pods scored")
    assert _score(base, prompt, lora_id=5) == {}
    assert _score(base, prompt, pods=["ns/b"]) == {"ns/b": {"matched_blocks": 1, "percent": 100.0 / 3}}

    code, metrics = _http(base + "/metrics")
    assert code == 200
    text = metrics.decode()
    assert 'kvcache_zmq_connection_status{pod_key="ns/a"} 1.0' in text
    assert 'kvcache_zmq_events_processed_total{event_type="BlockStored",pod_key="ns/a"} 1.0' in text
    code, health = _http(base + "/healthz")
    assert code == 200 and json.loads(health)["pods"] == ["ns/a", "ns/b"]

    # b leaves the file: unsubscribed, its entries and series gone
    _write_pods(pods_file, [a])
    wait_until(lambda: json.loads(_http(base + "/healthz")[1])["pods"] == ["ns/a"], 30, "b removed")
    wait_until(lambda: "ns/b" not in _score(base, prompt), 30, "b's entries removed")
    assert 'pod_key="ns/b"' not in _http(base + "/metrics")[1].decode()

    # evictions reach the index
    a.publish_events([a.engine.evict(1)])
    wait_until(lambda: _score(base, prompt)["ns/a"]["matched_blocks"] == 2, 30, "eviction applied")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


@pytest.mark.parametrize("body, code", [
    (b"not json", 400), (b"[]", 400), (b'{"token_ids": [1]}', 400),
    (b'{"model": "m", "token_ids": [-1]}', 400), (b'{"model": "m", "token_ids": "1 2"}', 400),
    (b'{"model": "m", "token_ids": [1], "lora_id": "x"}', 400),
    (b'{"model": "m", "token_ids": [1], "pods": "a"}', 400),
])  # fmt: skip
def test_bad_requests_get_400_and_the_server_keeps_serving(command, body, code):
    _, base, _ = command
    status, data = _http(base + "/v1/score", body)
    assert status == code
    assert "error" in json.loads(data)
    assert _score(base, [1, 2, 3, 4]) == {}


def test_wrong_paths_and_methods(command):
    _, base, _ = command
    assert _http(base + "/nope")[0] == 404
    assert _http(base + "/v1/score")[0] == 405
    assert _http(base + "/metrics", b"{}")[0] == 405
    assert _http(base + "/v1/score", b"{}", method="PUT")[0] == 405


def test_missing_pods_file_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgellm.cli", "kv-events", "--pods", str(tmp_path / "none.json"),
         "--http-port", "0"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr


@pytest.mark.redis
def test_redis_index_backend(tmp_path, rigs, redis_server):
    a, _ = rigs
    pods_file = tmp_path / "pods.json"
    _write_pods(pods_file, [a])
    proc, base = _start(pods_file, "--redis-url", redis_server.url)
    try:
        chain = a.engine.store_chain(2)
        a.publish_events([chain])
        wait_until(lambda: _score(base, list(chain.token_ids)).get("ns/a", {}).get("matched_blocks") == 2,
                   30, "scored through redis")  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        _finish(proc)


def test_http_port_in_use_exits_2(tmp_path):
    import socket

    pods_file = tmp_path / "pods.json"
    pods_file.write_text("[]")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "edgellm.cli", "kv-events", "--pods", str(pods_file),
             "--http-port", str(taken.getsockname()[1])], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 2
    assert "Address already in use" in proc.stderr


def test_unit_registry_source_end_to_end(tmp_path, rigs):
    from kvfakes.sys_kv import SysKV

    from edgellm.comm.sys_client import SysClient
    from edgellm.discovery.unit_registry import announce

    a, _ = rigs
    with SysKV(str(tmp_path)) as service:
        service.store["llm.0.out_port"] = "ipc:///tmp/llm/5010.sock"
        with SysClient(runtime_dir=str(tmp_path)) as client:
            announce(client, "llm.0", ip=a.host, model="m", pub_port=a.pub_port,
                     router_port=a.router_port)  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.cli", "kv-events", "--unit-registry", str(tmp_path),
             "--http-port", "0", "--block-size", str(BLOCK), "--poll-interval", "0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            line = proc.stdout.readline()
            assert "listening on http://" in line, line
            base = line.strip().rsplit(" ", 1)[1]
            chain = a.engine.store_chain(2)
            a.publish_events([chain])
            wait_until(lambda: _score(base, list(chain.token_ids)) == {
                "unit/llm.0": {"matched_blocks": 2, "percent": 100.0}}, 30, "unit pod scored")  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            _finish(proc)


def test_kubernetes_source_end_to_end(tmp_path, rigs):
    import yaml
    from kvfakes.fake_k8s import FakeKubeAPI

    a, _ = rigs
    with FakeKubeAPI() as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
            "users": [{"name": "me", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
        }))  # fmt: skip
        labels = {"model.aibrix.ai/name": "m", "model.aibrix.ai/kv-events-enabled": "true"}
        annotations = {"kvevents.edgellm.io/pub-port": str(a.pub_port),
                       "kvevents.edgellm.io/router-port": str(a.router_port)}  # fmt: skip
        api.apply(api.pod("vllm-0", ns="serving", ip=a.host, labels=labels, annotations=annotations))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "KUBECONFIG": str(kubeconfig)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.cli", "kv-events", "--kubernetes", "--namespace",
             "serving", "--http-port", "0", "--block-size", str(BLOCK)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            line = proc.stdout.readline()
            assert "listening on http://" in line, proc.stderr.read() if proc.poll() is not None else line
            base = line.strip().rsplit(" ", 1)[1]
            chain = a.engine.store_chain(2)
            a.publish_events([chain])
            wait_until(lambda: _score(base, list(chain.token_ids)) == {
                "serving/vllm-0": {"matched_blocks": 2, "percent": 100.0}}, 30, "k8s pod scored")  # fmt: skip
            api.delete("serving", "vllm-0")
            wait_until(lambda: _score(base, list(chain.token_ids)) == {}, 30, "pod deleted")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            _finish(proc)
