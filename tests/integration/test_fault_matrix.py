"""The fault matrix with real processes (a unit manager, the llm unit on the tiny model, TCP
clients): a unit killed mid-stream, the unit manager killed and restarted under a running
unit, a client that disconnects mid-generation. Each outcome is asserted before a generous
deadline; how fast it comes is measured by bench/faults.py."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from manager_support import Client, ManagerProcess, UnitProcess
from waits import wait_until

pytest.importorskip("torch")

MODEL = "tiny-llama"
STREAM = "llm.utf-8.stream"
LONG = {"prompt": "hello", "max_tokens": 900, "ignore_eos": True}


def llm_unit(runtime_dir: str, tiny_model_dir: str) -> UnitProcess:
    return UnitProcess(runtime_dir, "llm", "llm", "--model", f"{MODEL}={tiny_model_dir}",
                       "--kv-cache-mb", "2", "--threads", "1", timeout=120)  # fmt: skip


def setup(client: Client, request_id: str = "s") -> str:
    answer = client.request({"request_id": request_id, "work_id": "llm", "action": "setup",
                             "object": "llm.setup",
                             "data": {"model": MODEL, "response_format": STREAM, "input": STREAM,
                                      "enoutput": True, "max_token_len": 1000}})  # fmt: skip
    assert answer["error"]["code"] == 0, answer
    return answer["work_id"]


def start_long_generation(client: Client, work_id: str, pieces: int = 3) -> None:
    """A generation of 900 tokens, read until ``pieces`` pieces have come: it runs now."""
    client.send({"request_id": "g", "work_id": work_id, "action": "inference",
                 "object": STREAM, "data": LONG})  # fmt: skip
    for _ in range(pieces):
        answer = client.recv()
        assert answer["error"]["code"] == 0 and answer["data"]["finish"] is False, answer


def sys_request(client: Client, action: str, work_id: str = "sys") -> dict:
    return client.request({"request_id": action, "work_id": work_id, "action": action})


def running(client: Client) -> int:
    stats = sys_request(client, "stats", "llm")["data"][MODEL]
    return stats["num_requests_running"] + stats["num_requests_waiting"]


def test_a_unit_killed_mid_stream_ends_the_stream_with_an_error(runtime_dir, tiny_model_dir):
    # a request timeout of 120 s: only the manager seeing the unit gone can answer in time
    with ManagerProcess(runtime_dir, "--request-timeout", "120") as manager, \
            Client(manager.port, timeout=30) as client:  # fmt: skip
        unit = llm_unit(runtime_dir, tiny_model_dir)
        try:
            work_id = setup(client)
            start_long_generation(client, work_id)
            os.kill(unit.proc.pid, signal.SIGKILL)
        finally:
            unit.kill()
        while True:  # pieces already on their way may come first; then the terminal error
            answer = client.recv()
            if answer["error"]["code"] != 0:
                break
            assert answer["data"]["finish"] is False, "the stream must not end as if complete"
        assert (answer["error"]["code"], answer["request_id"], answer["work_id"]) == (-9, "g", work_id)
        assert "went away" in answer["error"]["message"]
        pong = client.request({"request_id": "p", "work_id": "sys", "action": "ping"})
        assert (pong["request_id"], pong["error"]["code"]) == ("p", 0)


def test_a_manager_killed_and_restarted_under_a_running_unit(runtime_dir, tiny_model_dir):
    first = ManagerProcess(runtime_dir)
    with llm_unit(runtime_dir, tiny_model_dir) as unit:
        old = Client(first.port, timeout=30)
        try:
            old_task = setup(old)
            start_long_generation(old, old_task)
            first.kill()  # SIGKILL: no goodbye to anyone
            old.sock.settimeout(10)
            with pytest.raises(ConnectionError):  # end of stream, not a hang
                while True:
                    old.recv()
        finally:
            old.close()
            first.kill()
        # new work ids from 100: the old task's llm.0 cannot be mistaken for a new one
        with ManagerProcess(runtime_dir, "--work-id", "100") as second, \
                Client(second.port, timeout=30) as client:  # fmt: skip

            def registered() -> bool:
                units = {u["unit"]: u for u in sys_request(client, "lsunit")["data"]}
                return units.get("llm", {}).get("pid") == unit.proc.pid

            wait_until(registered, 10, "the running unit registered again under its name")
            wait_until(lambda: any(m.get("unit") == "llm" for m in
                                   sys_request(client, "lsmode")["data"]),
                       10, "its model listed again")  # fmt: skip
            work_id = setup(client)
            assert work_id == "llm.100"
            answers = client.stream({"request_id": "i", "work_id": work_id, "action": "inference",
                                     "object": STREAM,
                                     "data": {"prompt": "hi", "max_tokens": 4}})  # fmt: skip
            assert answers[-1]["data"]["finish"] is True
            # the old task ended with its manager: the unit holds only the new one
            assert sys_request(client, "taskinfo", "llm")["data"] == ["llm.100"]
            wait_until(lambda: running(client) == 0, 10, "the old generation stopped")
        assert unit.proc.poll() is None


def test_a_client_that_disconnects_mid_generation_stops_it_and_frees_its_task(
    runtime_dir, tiny_model_dir
):
    with ManagerProcess(runtime_dir) as manager, llm_unit(runtime_dir, tiny_model_dir), \
            Client(manager.port, timeout=30) as watcher:  # fmt: skip
        leaving = Client(manager.port, timeout=30)
        try:
            work_id = setup(leaving)
            (task,) = sys_request(watcher, "lstask")["data"]
            start_long_generation(leaving, work_id)
            assert running(watcher) == 1
        finally:
            leaving.sock.shutdown(socket.SHUT_RDWR)
            leaving.close()
        wait_until(lambda: running(watcher) == 0, 10, "the engine aborted the generation")
        wait_until(lambda: sys_request(watcher, "lstask")["data"] == [], 10, "the task released")
        assert sys_request(watcher, "taskinfo", "llm")["data"] == []  # gone in the unit too
        setup(watcher, "again")  # its work id is not reused, its ports are
        (again,) = sys_request(watcher, "lstask")["data"]
        assert again["work_id"] != work_id
        assert (again["output_url"], again["inference_url"]) == (task["output_url"],
                                                                 task["inference_url"])


def test_reset_mid_generation_ends_the_stream_with_its_terminal_piece(runtime_dir, tiny_model_dir):
    with ManagerProcess(runtime_dir) as manager, llm_unit(runtime_dir, tiny_model_dir), \
            Client(manager.port, timeout=30) as client, Client(manager.port) as admin:  # fmt: skip
        work_id = setup(client)
        start_long_generation(client, work_id)
        assert sys_request(admin, "reset")["error"]["message"] == "reset: 1 task(s) ended"
        while True:
            answer = client.recv()
            if answer["data"]["finish"]:
                break
        assert answer["request_id"] == "g" and answer["data"]["finish_reason"] == "abort"
        wait_until(lambda: running(admin) == 0, 10, "the engine aborted the generation")
        assert sys_request(admin, "taskinfo", "llm")["data"] == []
