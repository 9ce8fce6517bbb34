"""The bad-input corpus (tests/bad_input/corpus.jsonl) on one connection to a real unit
manager with an echo unit: each case gets exactly its expected answers, and afterwards the
same connection still serves a setup and a streamed inference."""

from __future__ import annotations

import base64
import json
import os
import tempfile

import pytest
from manager_support import Client, ManagerProcess, UnitProcess, inference_request, setup_request

CORPUS = os.path.join(os.path.dirname(__file__), "..", "bad_input", "corpus.jsonl")


def load_corpus() -> list[dict]:
    with open(CORPUS, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def payload(case: dict) -> bytes:
    if "send" in case:
        return case["send"].encode("utf-8")
    if "send_b64" in case:
        return base64.b64decode(case["send_b64"])
    t = case["send_template"]
    return (
        t["prefix"] + t["fill"] * t["count"] + t.get("suffix_fill", "") * t["count"] + t["suffix"]
    ).encode("utf-8")


@pytest.fixture(scope="module")
def stack():
    with tempfile.TemporaryDirectory(prefix="el-bad-", dir="/tmp") as runtime_dir:
        with ManagerProcess(runtime_dir) as manager, UnitProcess(runtime_dir):
            yield manager


def test_corpus_is_well_formed():
    cases = load_corpus()
    assert len(cases) >= 30
    for case in cases:
        assert len({"send", "send_b64", "send_template"} & set(case)) == 1, case["name"]
        assert case["expect"] and all(len(e) == 3 for e in case["expect"]), case["name"]


def test_every_case_then_a_valid_session_on_the_same_connection(stack):
    with Client(stack.port, timeout=30) as client:
        for n, case in enumerate(load_corpus()):
            fence = f"fence-{n}"
            client.send(payload(case))
            client.send({"request_id": fence, "work_id": "sys", "action": "ping"})
            got = []
            while True:
                answer = client.recv()
                if answer["request_id"] == fence and answer["error"]["code"] == 0:
                    break
                got.append([answer["error"]["code"], answer["request_id"], answer["work_id"]])
            assert got == case["expect"], case["name"]
        setup = client.request(setup_request())
        assert setup["error"]["code"] == 0
        pieces = client.stream(inference_request(setup["work_id"], "still here"))
        assert [p["data"]["delta"] for p in pieces] == ["still here", "hello", ""]
