"""Faults around a request in flight, with real processes: a client that leaves (the
generation stops on the engine), a unit or a unit manager killed mid-stream (one error
event, then ``[DONE]``), a full backend (429 + ``Retry-After``), a deadline (504), SIGTERM
(requests in flight finish within the drain time, the rest end with an error event).

The unit runs a tiny model with a long context; ``ignore_eos`` with a large ``max_tokens``
makes a generation that lasts well beyond anything these tests wait for (~1 ms a token).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import time

import httpx
import pytest

from gateway_support import GatewayProcess, error_of, http, sse_events
from manager_support import Client, ManagerProcess, UnitProcess

pytest.importorskip("torch")

MODEL = "tiny-long"
LONG = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 15000,
        "ignore_eos": True, "temperature": 0}  # fmt: skip


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    from tiny_llm import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-long")), max_position_embeddings=16384)


class Box:
    def __init__(self, root: str, model_dir: str, name: str = "box-f", ports: int = 33000):
        self.runtime = os.path.join(root, name)
        os.makedirs(self.runtime)
        self.manager = ManagerProcess(self.runtime, "--box-name", name, "--min-port", str(ports),
                                      "--max-port", str(ports + 100))  # fmt: skip
        try:
            self.unit = UnitProcess(self.runtime, "llm", "llm", "--model", f"{MODEL}={model_dir}",
                                    "--kv-cache-mb", "32", "--threads", "1", timeout=120)  # fmt: skip
        except BaseException:
            self.manager.stop()
            raise
        self.address = f"127.0.0.1:{self.manager.port}"

    def running(self) -> int:
        with Client(self.manager.port, timeout=30) as c:
            answer = c.request({"request_id": "s", "work_id": "llm", "action": "stats"})
        return answer["data"][MODEL]["num_requests_running"]

    def close(self) -> None:
        self.unit.stop()
        self.manager.stop()


@pytest.fixture(scope="module")
def box(long_model):
    with tempfile.TemporaryDirectory(prefix="el-gwf-", dir="/tmp") as root:
        b = Box(root, long_model)
        try:
            yield b
        finally:
            b.close()


def _gateway(box: Box, long_model: str, *extra: str) -> GatewayProcess:
    return GatewayProcess("--box", box.address, "--tokenizer", f"{MODEL}={long_model}", *extra)


def _eventually(check, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.05)
    return time.monotonic() - started


def _stream_some(gw: GatewayProcess, body: dict, pieces: int = 3):
    """Open a streamed completion and read ``pieces`` text chunks; returns (response,
    iterator, client) still open."""
    client = httpx.Client(base_url=gw.url, timeout=60)
    response = client.send(client.build_request("POST", "/v1/completions",
                                                json={**body, "stream": True}), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    seen = 0
    for line in lines:
        if line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
            seen += 1
            if seen == pieces:
                break
    return response, lines, client


def test_a_client_leaving_mid_stream_stops_the_generation(box, long_model):
    with _gateway(box, long_model) as gw:
        response, _, client = _stream_some(gw, LONG)
        assert box.running() == 1
        response.close()
        client.close()
        took = _eventually(lambda: box.running() == 0, 5, "the engine stopped generating")
        assert took < 5  # the whole generation takes ~15 s
        # the task is clean and the cache consistent: the same prompt again, its blocks cached
        status, headers, raw = http(gw, "POST", "/v1/completions", {**LONG, "max_tokens": 4})
        assert status == 200 and json.loads(raw)["choices"][0]["finish_reason"] == "length"
        metrics = http(gw, "GET", "/metrics")[2].decode()
        assert 'edgellm_gateway_requests_total{endpoint="/v1/completions",model="tiny-long",status="499"} 1.0' in metrics
        assert 'edgellm_gateway_backend_in_flight{backend="box-f/llm"} 0.0' in metrics


def test_a_client_leaving_a_whole_answer_stops_it_too(box, long_model):
    with _gateway(box, long_model) as gw:
        body = json.dumps(LONG).encode()
        with socket.create_connection((gw.host, gw.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            _eventually(lambda: box.running() == 1, 10, "the generation started")
        _eventually(lambda: box.running() == 0, 5, "the engine stopped generating")
        assert http(gw, "POST", "/v1/completions", {**LONG, "max_tokens": 3})[0] == 200


def test_a_full_backend_answers_429_with_retry_after(box, long_model):
    with _gateway(box, long_model, "--max-queue", "1") as gw:
        response, _, client = _stream_some(gw, LONG)
        status, headers, raw = http(gw, "POST", "/v1/completions", {**LONG, "max_tokens": 2})
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert error_of(raw)["type"] == "rate_limit_error"
        response.close()
        client.close()
        _eventually(lambda: http(gw, "POST", "/v1/completions", {**LONG, "max_tokens": 2})[0] == 200,
                    10, "the slot came back")  # fmt: skip


def test_the_request_deadline(box, long_model):
    with _gateway(box, long_model, "--request-timeout", "1.5") as gw:
        started = time.monotonic()
        status, _, raw = http(gw, "POST", "/v1/completions", {**LONG, "stream": True})
        events = sse_events(raw)
        assert status == 200 and events[-1] == "[DONE]" and time.monotonic() - started < 10
        assert json.loads(events[-2])["error"]["code"] == "timeout"
        status, _, raw = http(gw, "POST", "/v1/completions", LONG)
        assert status == 504 and error_of(raw)["code"] == "timeout"
        _eventually(lambda: box.running() == 0, 5, "timed-out generations stopped")


def test_sigterm_lets_requests_finish_then_ends_the_rest(box, long_model):
    gw = _gateway(box, long_model, "--drain-timeout", "30")
    try:
        short = {**LONG, "max_tokens": 1500}  # ~1.5 s
        response, lines, client = _stream_some(gw, short)
        gw.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
        client.close()
        assert gw.proc.wait(30) == 0
    finally:
        gw.stop()

    gw = _gateway(box, long_model, "--drain-timeout", "1")
    try:
        response, lines, client = _stream_some(gw, LONG)
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
        assert gw.proc.wait(30) == 0 and time.monotonic() - started < 10
        client.close()
    finally:
        gw.stop()
    _eventually(lambda: box.running() == 0, 5, "the ended generation stopped on the engine")


@pytest.mark.parametrize("victim", ["unit", "manager"])
def test_a_backend_killed_mid_stream_gets_an_error_event_then_done(long_model, victim):
    with tempfile.TemporaryDirectory(prefix="el-gwk-", dir="/tmp") as root:
        doomed = Box(root, long_model, name="box-k", ports=33200)
        try:
            with _gateway(doomed, long_model) as gw:
                response, lines, client = _stream_some(gw, LONG)
                getattr(doomed, victim).proc.send_signal(signal.SIGKILL)
                started = time.monotonic()
                rest = [line for line in lines if line.startswith("data: ")]
                assert time.monotonic() - started < 5
                assert rest[-1] == "data: [DONE]"
                error = json.loads(rest[-2][6:])["error"]
                assert error["type"] == "server_error" and error["message"]
                client.close()
                status, _, raw = http(gw, "POST", "/v1/completions", {**LONG, "max_tokens": 2})
                assert status == 503 and error_of(raw)
                assert http(gw, "GET", "/health")[0] == 503 or victim == "unit"
        finally:
            doomed.close()


def test_a_restarted_unit_is_served_again_without_an_error(long_model, tmp_path):
    """The unit restarts under the same manager: the gateway's idle tasks are gone with it;
    requests get fresh tasks, no client sees an error. The client's X-Request-Id is the
    request id in the unit's log."""
    with tempfile.TemporaryDirectory(prefix="el-gwr-", dir="/tmp") as root:
        box = Box(root, long_model, name="box-r", ports=33400)
        try:
            with _gateway(box, long_model, "--warm-tasks", "2") as gw:
                body = {**LONG, "max_tokens": 3}
                assert http(gw, "POST", "/v1/completions", body)[0] == 200
                box.unit.stop()
                with open(tmp_path / "unit.log", "wb") as log:
                    box.unit = UnitProcess(box.runtime, "llm", "llm", "--model",
                                           f"{MODEL}={long_model}", "--kv-cache-mb", "32",
                                           "--threads", "1", timeout=120, log_level="INFO",
                                           stderr=log)  # fmt: skip
                for i in range(5):
                    status, _, raw = http(gw, "POST", "/v1/completions", body,
                                          {"X-Request-Id": f"trace-{i}-e2e"})  # fmt: skip
                    assert status == 200, raw
                logged = (tmp_path / "unit.log").read_text()
                assert all(f"request trace-{i}-e2e:" in logged for i in range(5)), logged[-2000:]
        finally:
            box.close()
