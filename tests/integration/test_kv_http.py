"""The scoring HTTP server in-process: limits, health states, answers."""

from __future__ import annotations

import http.client
import json

import pytest
from prometheus_client import CollectorRegistry

from kvfakes.reference_index import ReferenceIndex  # noqa: E402

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
    assert status == 503 and "redis is gone" in body["error"]


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
    assert status == 400 and "0..2**32-1" in body["error"]


def test_parse_score_request():
    assert parse_score_request(b'{"model": "m", "token_ids": [1, 2]}') == ("m", -1, [1, 2], None)
    assert parse_score_request(b'{"model": "m", "token_ids": [], "lora_id": null, "pods": ["a"]}') == (
        "m", -1, [], ["a"])  # fmt: skip
    for bad in (b'{"model": "m", "token_ids": [true]}', b'{"model": "", "token_ids": []}',
                b'{"model": "m", "token_ids": [4294967296]}', b"\xff"):  # fmt: skip
        with pytest.raises(BadRequest):
            parse_score_request(bad)
