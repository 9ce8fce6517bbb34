"""The scoring HTTP server in-process: limits, health states, answers."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest
from prometheus_client import CollectorRegistry

from kvfakes.reference_index import ReferenceIndex  # noqa: E402
from waits import wait_until  # noqa: E402

from edgellm.discovery.provider import StaticPodProvider  # noqa: E402
from edgellm.kvevents.config import ManagerConfig  # noqa: E402
from edgellm.kvevents.http import BadRequest, ScoreServer, parse_score_request  # noqa: E402
from edgellm.kvevents.manager import KVEventManager  # noqa: E402


@pytest.fixture
def served():
    index = ReferenceIndex()
    registry = CollectorRegistry()
    manager = KVEventManager(StaticPodProvider(), index, config=ManagerConfig(enabled=True),
                             registry=registry).start()  # fmt: skip
    server = ScoreServer(manager, index, registry, max_body=1000).start()
    yield server, index, manager
    server.stop()
    server.stop()
    manager.stop()


def _request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def test_score_answers_from_the_index(served):
    server, index, _ = served
    index.process_block_stored(("m", -1), "ns/a", [1, 2], None, list(range(8)), 4)
    status, body = _request(server, "POST", "/v1/score",
                            json.dumps({"model": "m", "token_ids": list(range(8))}))  # fmt: skip
    assert status == 200
    assert body == {"pods": {"ns/a": {"matched_blocks": 2, "percent": 100.0}}}


def test_body_limits(served):
    server, _, _ = served
    status, body = _request(server, "POST", "/v1/score", b"x" * 2000)
    assert status == 413 and "error" in body
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.putrequest("POST", "/v1/score")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411
    conn.close()


def test_health_follows_index_readiness_and_manager_state(served):
    server, index, manager = served
    assert _request(server, "GET", "/healthz") == (200, {"status": "ok", "index_ready": True, "pods": []})
    index.ready = False
    status, body = _request(server, "GET", "/healthz")
    assert status == 503 and body["status"] == "unavailable"
    index.ready = True
    manager.stop()
    assert _request(server, "GET", "/healthz")[0] == 503


class BrokenIndex(ReferenceIndex):
    def match_prefix(self, *args, **kwargs):
        raise ConnectionError("redis is gone")


def test_index_failure_is_503():
    index = BrokenIndex()
    registry = CollectorRegistry()
    manager = KVEventManager(StaticPodProvider(), index, config=ManagerConfig(enabled=True),
                             registry=registry)  # fmt: skip
    with ScoreServer(manager, index, registry) as server:
        status, body = _request(server, "POST", "/v1/score", json.dumps({"model": "m", "token_ids": [1]}))
    # The error shape is OpenAI's since kv-events moved onto the gateway's HTTP stack (it was
    # {"error": "<message>"}): the message moved under "error"."message".
    assert status == 503 and "redis is gone" in body["error"]["message"]
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "index_unavailable"


class RefusingIndex(ReferenceIndex):
    def match_prefix(self, *args, **kwargs):
        from edgellm.kvindex.api import IndexInputError

        raise IndexInputError("token_ids must hold ints in 0..2**32-1")


def test_input_the_index_refuses_is_400():
    index = RefusingIndex()
    registry = CollectorRegistry()
    manager = KVEventManager(StaticPodProvider(), index, config=ManagerConfig(enabled=True),
                             registry=registry)  # fmt: skip
    with ScoreServer(manager, index, registry) as server:
        status, body = _request(server, "POST", "/v1/score", json.dumps({"model": "m", "token_ids": [1]}))
    assert status == 400 and "0..2**32-1" in body["error"]["message"]  # OpenAI's shape
    assert body["error"]["type"] == "invalid_request_error"


def test_parse_score_request():
    assert parse_score_request(b'{"model": "m", "token_ids": [1, 2]}') == ("m", -1, [1, 2], None)
    assert parse_score_request(b'{"model": "m", "token_ids": [], "lora_id": null, "pods": ["a"]}') == (
        "m", -1, [], ["a"])  # fmt: skip
    for bad in (b'{"model": "m", "token_ids": [true]}', b'{"model": "", "token_ids": []}',
                b'{"model": "m", "token_ids": [4294967296]}', b"\xff"):  # fmt: skip
        with pytest.raises(BadRequest):
            parse_score_request(bad)


def _raw(server, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; read one answer (status, headers, body)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock, \
            sock.makefile("rb") as reader:  # fmt: skip
        sock.sendall(data)
        status = int(reader.readline().split()[1])
        headers = {}
        while (line := reader.readline().strip()):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        if data.startswith(b"HEAD "):
            return status, headers, b""
        return status, headers, reader.read(int(headers.get("content-length", 0)))


@pytest.mark.parametrize("body", [
    b'{"model": "m", "token_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"[" * 1_000_000,
    b'{"model": "m", "token_ids": [' + b"9" * 5000 + b"]}",
    b'{"model": "m", "token_ids": [NaN]}',
    '{"model": "m", "token_ids": [1]}'.encode("utf-16"),
    b'{"model": "m", "lora_id": 1' + b"0" * 30 + b', "token_ids": [1]}',
    b'{"model": "\\ud800", "token_ids": [1]}',  # a lone surrogate: no text
    b'{"model": "m", "token_ids": [1], "pods": ["\\udfff"]}',
])  # fmt: skip
def test_deeply_nested_or_odd_json_gets_a_400_answer(body):
    index = ReferenceIndex()
    registry = CollectorRegistry()
    manager = KVEventManager(StaticPodProvider(), index, config=ManagerConfig(enabled=True),
                             registry=registry)  # fmt: skip
    with ScoreServer(manager, index, registry) as server:
        status, body = _request(server, "POST", "/v1/score", body)
        assert status == 400 and "error" in body
        assert _request(server, "GET", "/healthz")[0] == 503  # still serving (manager unstarted)


def test_methods_a_path_does_not_take_get_405_with_allow(served):
    server, _, _ = served
    for method, path, allow in [("OPTIONS", "/v1/score", "POST"), ("HEAD", "/v1/score", "POST"),
                                ("BREW", "/v1/score", "POST"), ("DELETE", "/metrics", "GET, HEAD"),
                                ("POST", "/healthz", "GET, HEAD")]:  # fmt: skip
        status, headers, body = _raw(server, f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                                              "Content-Length: 0\r\n\r\n".encode())
        assert (status, headers["allow"], headers["content-type"]) == (405, allow, "application/json")
        if method != "HEAD":
            assert "error" in json.loads(body)
    status, headers, _ = _raw(server, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and int(headers["content-length"]) > 0
    status, headers, body = _raw(server, b"GET /a b HTTP/1.1\r\n\r\n")  # 4 words
    assert status == 400 and headers["content-type"] == "application/json"


def test_stalled_bodies_get_408_and_free_their_threads():
    index = ReferenceIndex()
    registry = CollectorRegistry()
    manager = KVEventManager(StaticPodProvider(), index, config=ManagerConfig(enabled=True),
                             registry=registry).start()  # fmt: skip
    before = threading.active_count()
    with ScoreServer(manager, index, registry, request_timeout=0.5) as server:
        stalled = []
        for _ in range(50):  # promise 100 bytes, send 10
            sock = socket.create_connection((server.host, server.port), timeout=10)
            sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                         b'{"model": ')
            stalled.append(sock)
        assert _request(server, "POST", "/v1/score",
                        json.dumps({"model": "m", "token_ids": [1]}))[0] == 200  # fmt: skip
        for sock in stalled:
            with sock, sock.makefile("rb") as reader:
                assert reader.readline().split()[1] == b"408"
        wait_until(lambda: threading.active_count() <= before + 2, 20, "handler threads gone")
    manager.stop()


def test_api_key_and_the_health_alias():
    index = ReferenceIndex()
    registry = CollectorRegistry()
    manager = KVEventManager(StaticPodProvider(), index, config=ManagerConfig(enabled=True),
                             registry=registry).start()  # fmt: skip
    try:
        with ScoreServer(manager, index, registry, api_key="k3y") as server:
            body = json.dumps({"model": "m", "token_ids": [1]})
            status, answer = _request(server, "POST", "/v1/score", body)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
            assert _request(server, "GET", "/metrics")[0] == 401
            assert _request(server, "POST", "/v1/score", body, {"Authorization": "Bearer k3y"})[0] == 200
            assert _request(server, "GET", "/health") == _request(server, "GET", "/healthz")
            assert _request(server, "GET", "/health")[0] == 200
    finally:
        manager.stop()
