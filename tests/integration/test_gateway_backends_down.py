"""Backends that go away: the gateway tries another before the first piece, skips a down one
until it is healthy again, answers 503 in OpenAI's shape when none is left; an HTTP engine
behind it (here: another gateway) is proxied, streaming, with its errors passed on."""

from __future__ import annotations

import json
import time

import openai
import pytest

from gateway_support import GatewayProcess, error_of, http, sse_events
from manager_support import ManagerProcess, UnitProcess

MODEL = "echo-model"
CHAT = "/v1/chat/completions"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}


def _box(tmp_path, name: str):
    runtime = tmp_path / name
    lsmod = runtime / "lsmod"
    lsmod.mkdir(parents=True)
    (lsmod / "echo.json").write_text(json.dumps({
        "mode": MODEL, "type": "llm", "unit": "llm", "max_context": 256, "block_size": 16}))
    manager = ManagerProcess(str(runtime), "--lsmod-dir", str(lsmod))
    unit = UnitProcess(str(runtime))
    return manager, unit


def test_a_dead_box_is_skipped_and_none_left_is_503(tmp_path):
    (ma, ua), (mb, ub) = _box(tmp_path, "a"), _box(tmp_path, "b")
    try:
        with GatewayProcess("--box", f"127.0.0.1:{ma.port}", "--box", f"127.0.0.1:{mb.port}") as gw:
            gw.wait_ready()
            health = json.loads(http(gw, "GET", "/health")[2])
            assert sum(b["ready"] for b in health["backends"].values()) == 2
            ua.kill()
            ma.kill()  # box a is gone: its connection drops, its units are down
            targets = set()
            for _ in range(10):  # round-robin would alternate: every answer must still come
                status, headers, raw = http(gw, "POST", CHAT, BODY, {"routing-strategy": "round-robin"})
                assert status == 200, raw
                targets.add(headers["target-pod"])
            assert targets == {f"127.0.0.1:{mb.port}/llm"}
            health = json.loads(http(gw, "GET", "/health")[2])
            assert health["backends"][f"127.0.0.1:{ma.port}/llm"]["ready"] is False
            ub.kill()
            mb.kill()
            status, _, raw = http(gw, "POST", CHAT, BODY)
            assert status == 503 and error_of(raw)["type"] == "server_error"
            status, _, raw = http(gw, "POST", CHAT, {**BODY, "stream": True})
            assert status == 503 and sse_events(raw) == [] and error_of(raw)
            status, _, raw = http(gw, "GET", "/health")
            assert status == 503 and error_of(raw)["code"] == "no_backend_available"
    finally:
        for proc in (ua, ub, ma, mb):
            proc.stop()


def test_an_http_engine_behind_the_gateway(tmp_path):
    manager, unit = _box(tmp_path, "a")
    try:
        with GatewayProcess("--box", f"127.0.0.1:{manager.port}") as inner, \
                GatewayProcess("--engine", f"{inner.url},pod_key=inner") as outer:  # fmt: skip
            with openai.OpenAI(base_url=outer.url + "/v1", api_key="x", max_retries=0) as client:
                answer = client.chat.completions.create(model=MODEL, max_tokens=4, **{
                    "messages": [{"role": "user", "content": "via"}]})  # fmt: skip
                sent = json.loads(answer.choices[0].message.content.removesuffix("hello"))
                assert sent == {"messages": [{"role": "user", "content": "via"}], "max_tokens": 4}
                chunks = list(client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "s"}], stream=True))
                assert "".join(c.choices[0].delta.content or "" for c in chunks).endswith("hello")
                text = client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=2).choices[0].text
                assert json.loads(text.removesuffix("hello"))["prompt_token_ids"] == [1, 2]
            status, headers, _ = http(outer, "POST", CHAT, BODY, {"X-Request-Id": "through"})
            assert status == 200 and headers["target-pod"] == "inner"
            metrics = http(outer, "GET", "/metrics")[2].decode()
            assert 'edgellm_gateway_backend_up{backend="inner"} 1.0' in metrics
            inner.kill()
            status, _, raw = http(outer, "POST", CHAT, BODY)
            assert status == 503 and error_of(raw)
    finally:
        unit.stop()
        manager.stop()


@pytest.mark.parametrize("text", ["{box: 1}", "- {url: ftp://x}", "- {box: a, extra: 1}", "- [",
                                  "- {url: 'http://h:1', pub_port: 70000}"])
def test_a_bad_backends_file_is_refused_at_start(tmp_path, text):
    import subprocess
    import sys

    path = tmp_path / "backends.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "edgellm.cli", "serve", "--port", "0",
                           "--backends", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "serve:" in proc.stderr


def test_backends_from_kubernetes(tmp_path):
    import yaml
    from kvfakes.fake_k8s import FakeKubeAPI

    manager, unit = _box(tmp_path, "a")
    try:
        with GatewayProcess("--box", f"127.0.0.1:{manager.port}") as inner, FakeKubeAPI() as api:
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                "users": [{"name": "me", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
            }))  # fmt: skip
            labels = {"model.aibrix.ai/name": MODEL, "model.aibrix.ai/kv-events-enabled": "true"}
            api.apply(api.pod("engine-0", ns="serving", ip="127.0.0.1", labels=labels,
                              annotations={"serving.edgellm.io/port": str(inner.port)}))
            with GatewayProcess("--kubernetes", "--namespace", "serving",
                                env={"KUBECONFIG": str(kubeconfig)}) as outer:  # fmt: skip
                status, headers, _ = http(outer, "POST", CHAT, BODY)
                assert status == 200 and headers["target-pod"] == "serving/engine-0"
                api.delete("serving", "engine-0")
                deadline = time.monotonic() + 30
                while http(outer, "GET", "/health")[0] != 503:
                    assert time.monotonic() < deadline, "pod removal followed"
                    time.sleep(0.1)
                # nobody serves the model now: unavailable (503), not unknown (404), for a while
                status, _, raw = http(outer, "POST", CHAT, BODY)
                assert status == 503 and error_of(raw)["code"] == "no_backend_available"
    finally:
        unit.stop()
        manager.stop()


def test_a_backends_file_is_followed(tmp_path):
    (ma, ua), (mb, ub) = _box(tmp_path, "a"), _box(tmp_path, "b")
    path = tmp_path / "backends.yaml"
    path.write_text(f"- {{box: '127.0.0.1:{ma.port}'}}\n")
    try:
        with GatewayProcess("--backends", str(path)) as gw:
            def keys():
                return sorted(json.loads(http(gw, "GET", "/health")[2]).get("backends", {}))

            assert keys() == [f"127.0.0.1:{ma.port}/llm"]
            path.write_text(f"- {{box: '127.0.0.1:{ma.port}'}}\n- {{box: '127.0.0.1:{mb.port}'}}\n")
            deadline = time.monotonic() + 20
            while keys() != sorted([f"127.0.0.1:{ma.port}/llm", f"127.0.0.1:{mb.port}/llm"]):
                assert time.monotonic() < deadline, "the second box joined"
                time.sleep(0.1)
            path.write_text("- {box: [broken\n")  # a bad version: logged, the last good one stays
            time.sleep(2.5)
            assert len(keys()) == 2 and http(gw, "POST", CHAT, BODY)[0] == 200
            path.write_text(f"- {{box: '127.0.0.1:{mb.port}'}}\n")
            deadline = time.monotonic() + 20
            while keys() != [f"127.0.0.1:{mb.port}/llm"]:
                assert time.monotonic() < deadline, "the first box left"
                time.sleep(0.1)
    finally:
        for proc in (ua, ub, ma, mb):
            proc.stop()


def test_a_backend_failing_before_the_first_piece_is_retried_on_another(tmp_path):
    (ma, ua), (mb, ub) = _box(tmp_path, "a"), _box(tmp_path, "b")
    try:
        # checks far apart: the gateway learns that box a died only from a request
        with GatewayProcess("--box", f"127.0.0.1:{ma.port}", "--box", f"127.0.0.1:{mb.port}",
                            "--refresh-interval", "60") as gw:
            gw.wait_ready()
            assert len(json.loads(http(gw, "GET", "/health")[2])["backends"]) == 2
            ma.kill()
            for _ in range(2):  # round-robin: one of them is sent to box a first
                status, headers, raw = http(gw, "POST", CHAT, BODY, {"routing-strategy": "round-robin"})
                assert status == 200, raw
                assert headers["target-pod"] == f"127.0.0.1:{mb.port}/llm"
            metrics = http(gw, "GET", "/metrics")[2].decode()
            assert f'edgellm_gateway_retries_total{{backend="127.0.0.1:{ma.port}/llm",' in metrics
            assert f'edgellm_gateway_backend_up{{backend="127.0.0.1:{ma.port}/llm"}} 0.0' in metrics
    finally:
        for proc in (ua, ub, ma, mb):
            proc.stop()


def test_a_port_in_use_or_no_backend_is_exit_2():
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run([sys.executable, "-m", "edgellm.cli", "serve", "--box", "127.0.0.1:1",
                               "--port", str(taken.getsockname()[1])],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "cannot listen" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "edgellm.cli", "serve", "--port", "0"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "no backends" in proc.stderr
