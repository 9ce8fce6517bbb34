"""End to end with real processes: ``edgellm unit-manager`` + ``edgellm unit echo`` and TCP
clients: the upstream sample session, taskinfo, a chain across two units and two sessions,
a unit killed while a client waits, a manager restart under a running unit, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import zmq
from manager_support import (
    Client,
    ManagerProcess,
    UnitProcess,
    inference_request,
    setup_request,
    socket_files,
)
from waits import wait_until

ENVELOPE_KEYS = {"created", "data", "error", "object", "request_id", "work_id"}


@pytest.fixture
def stack(runtime_dir):
    with ManagerProcess(runtime_dir, "--request-timeout", "120") as manager:
        with UnitProcess(runtime_dir) as unit:
            yield manager, unit


def check_envelope(answer: dict) -> None:
    assert set(answer) == ENVELOPE_KEYS
    assert type(answer["created"]) is int and abs(answer["created"] - time.time()) < 600
    assert type(answer["error"]["code"]) is int and type(answer["error"]["message"]) is str
    assert type(answer["request_id"]) is str and type(answer["work_id"]) is str
    assert type(answer["object"]) is str


def test_upstream_sample_client_session(stack):
    manager, _ = stack
    with Client(manager.port) as client:
        setup = client.request(setup_request())
        check_envelope(setup)
        assert setup["error"] == {"code": 0, "message": ""}
        assert setup["request_id"] == "llm_001" and setup["work_id"] == "llm.0"
        for text in ("hello", "Grüße, 世界 🌍"):
            pieces = client.stream(inference_request("llm.0", text))
            for piece in pieces:
                check_envelope(piece)
                assert (piece["request_id"], piece["work_id"]) == ("llm_001", "llm.0")
                assert piece["object"] == "llm.utf-8.stream"
                assert set(piece["data"]) == {"delta", "finish", "index"}
                assert type(piece["data"]["index"]) is int and type(piece["data"]["finish"]) is bool
            assert [p["data"]["delta"] for p in pieces] == [text, "hello", ""]
            assert [p["data"]["finish"] for p in pieces] == [False, False, True]
        bye = client.request({"request_id": "llm_exit", "work_id": "llm.0", "action": "exit"})
        check_envelope(bye)
        assert (bye["error"]["code"], bye["request_id"], bye["work_id"]) == (0, "llm_exit", "llm.0")
        # the task and its inference url are gone
        gone = client.request(inference_request("llm.0", "x", request_id="late"))
        assert gone["error"]["code"] == -4


def _one_recv_message(sock) -> dict:
    """upstream sample/test.py's reader: recv(4096) until a newline has come, then parse
    everything received as one message (it fails when two arrive together)."""
    response = ""
    while "\n" not in response:
        part = sock.recv(4096).decode("utf-8")
        if not part:
            raise ConnectionError("closed")
        response += part
    return json.loads(response.strip())


def test_the_upstream_sample_reader_works_with_an_answer_gap(runtime_dir):
    with ManagerProcess(runtime_dir, "--answer-gap-ms", "5") as manager, \
            UnitProcess(runtime_dir), Client(manager.port) as client:
        client.send(setup_request())
        work_id = _one_recv_message(client.sock)["work_id"]
        for i in range(20):
            client.send(inference_request(work_id, f"m{i}"))
            deltas = []
            while True:
                answer = _one_recv_message(client.sock)  # json.loads raises on "Extra data"
                assert answer["error"]["code"] == 0
                deltas.append(answer["data"]["delta"])
                if answer["data"]["finish"]:
                    break
            assert deltas == [f"m{i}", "hello", ""]
        client.send({"request_id": "llm_exit", "work_id": work_id, "action": "exit"})
        assert _one_recv_message(client.sock)["error"]["code"] == 0


def test_taskinfo_of_the_unit_and_of_a_task(stack):
    manager, _ = stack
    with Client(manager.port) as client:
        a = client.request(setup_request(request_id="a"))["work_id"]
        b = client.request(setup_request(request_id="b", response_format="llm.utf-8"))["work_id"]
        listing = client.request({"request_id": "t", "work_id": "llm", "action": "taskinfo"})
        assert (listing["object"], listing["data"]) == ("llm.tasklist", [a, b])
        info = client.request({"request_id": "t2", "work_id": b, "action": "taskinfo"})
        assert info["object"] == "llm.taskinfo"
        assert info["data"]["response_format"] == "llm.utf-8"
        # a non-stream task answers once, with the whole text
        once = client.stream(inference_request(b, "ab"))
        assert len(once) == 1 and once[0]["data"] == "abhello"
        missing = client.request({"request_id": "t3", "work_id": "llm.99", "action": "taskinfo"})
        assert missing["error"]["code"] == -6


def test_chain_across_two_units_and_two_sessions(runtime_dir):
    with ManagerProcess(runtime_dir) as manager, UnitProcess(runtime_dir, "kws"), UnitProcess(runtime_dir):
        with Client(manager.port) as first, Client(manager.port) as second:
            upstream = first.request(setup_request("kws", request_id="k"))["work_id"]
            assert upstream.startswith("kws.")
            downstream = second.request(
                setup_request(request_id="l", input=["llm.utf-8.stream", upstream])
            )
            assert downstream["error"]["code"] == 0, downstream
            pieces = first.stream(inference_request(upstream, "wake", unit="kws"))
            assert [p["data"]["delta"] for p in pieces] == ["wake", "hello", ""]
            chained = []
            while not chained or not chained[-1]["data"]["finish"]:
                chained.append(second.recv())
            assert all(p["work_id"] == downstream["work_id"] for p in chained)
            assert [p["data"]["delta"] for p in chained] == ["wakehello", "hello", ""]


def test_a_pipeline_head_with_enoutput_false_gets_no_stray_error(runtime_dir):
    # The head's outputs only feed the chained task; the client hears from the tail. The
    # manager must not wait for (and then time out) an answer from the head.
    with ManagerProcess(runtime_dir, "--request-timeout", "1") as manager, \
            UnitProcess(runtime_dir, "kws"), UnitProcess(runtime_dir):
        with Client(manager.port) as client:
            head = client.request(setup_request("kws", request_id="h", enoutput=False))
            assert head["error"]["code"] == 0
            tail = client.request(setup_request(request_id="t", input=[head["work_id"]]))
            assert tail["error"]["code"] == 0
            client.send(inference_request(head["work_id"], "wake", unit="kws", request_id="w"))
            chained = [client.recv() for _ in range(3)]
            assert [(p["work_id"], p["data"]["delta"]) for p in chained] == \
                [(tail["work_id"], "wakehello"), (tail["work_id"], "hello"), (tail["work_id"], "")]
            time.sleep(1.5)  # past the 1 s request timeout: a stray -9 would be queued now
            pong = client.request({"request_id": "after", "work_id": "sys", "action": "ping"})
            assert (pong["request_id"], pong["error"]["code"]) == ("after", 0)
            tasks = client.request({"request_id": "ls", "work_id": "sys", "action": "lstask"})
            assert {t["work_id"]: t["enoutput"] for t in tasks["data"]} == \
                {head["work_id"]: False, tail["work_id"]: True}


def test_a_non_stream_request_with_finish_false_data_still_gets_an_answer(runtime_dir):
    with ManagerProcess(runtime_dir, "--request-timeout", "1") as manager, \
            UnitProcess(runtime_dir) as unit, Client(manager.port) as client:
        work_id = client.request(setup_request())["work_id"]
        os.kill(unit.proc.pid, signal.SIGSTOP)  # the unit will stay silent
        try:
            client.send({"request_id": "nf", "work_id": work_id, "action": "inference",
                         "object": "llm.utf-8", "data": {"delta": "x", "finish": False}})
            answer = client.recv()  # from the manager, at the 1 s deadline
        finally:
            os.kill(unit.proc.pid, signal.SIGCONT)
        assert (answer["request_id"], answer["error"]["code"]) == ("nf", -9)


def test_killing_a_unit_while_a_client_waits_answers_the_client(stack):
    manager, unit = stack
    with Client(manager.port) as client:
        work_id = client.request(setup_request())["work_id"]
        os.kill(unit.proc.pid, signal.SIGSTOP)  # the unit takes the request but never answers
        try:
            client.send(inference_request(work_id, "anyone?", request_id="w"))
            # requests are handled in order: once ping is answered, the inference is published
            ping = client.request({"request_id": "p", "work_id": "sys", "action": "ping"})
            assert ping["request_id"] == "p"
        finally:
            os.kill(unit.proc.pid, signal.SIGKILL)
            os.kill(unit.proc.pid, signal.SIGCONT)
        # --request-timeout is 120 s: only the manager noticing the unit is gone answers now
        answer = client.recv()
        assert (answer["error"]["code"], answer["request_id"], answer["work_id"]) == (-9, "w", work_id)
        # a dead unit's task no longer takes requests
        again = client.request(inference_request(work_id, "x", request_id="w2"))
        assert (again["error"]["code"], again["request_id"]) == (-4, "w2")
        unit.proc.wait(10)


def test_tasks_of_a_unit_that_died_are_released_after_the_orphan_timeout(runtime_dir):
    with ManagerProcess(runtime_dir, "--orphan-timeout", "0.5") as manager, \
            Client(manager.port) as client:
        with UnitProcess(runtime_dir) as unit:
            first = client.request(setup_request())
            listing = client.request({"request_id": "ls", "work_id": "sys", "action": "lstask"})
            assert [t["work_id"] for t in listing["data"]] == [first["work_id"]]
            ports = (listing["data"][0]["output_url"], listing["data"][0]["inference_url"])
            unit.kill()  # no release_unit: only the subscription going away tells
        wait_until(lambda: client.request({"request_id": "ls", "work_id": "sys",
                                           "action": "lstask"})["data"] == [],
                   10, "the dead unit's task released")  # fmt: skip
        with UnitProcess(runtime_dir):  # the freed ports are handed out again
            again = client.request(setup_request(request_id="again"))
            assert again["error"]["code"] == 0
            listing = client.request({"request_id": "ls", "work_id": "sys", "action": "lstask"})
            assert (listing["data"][0]["output_url"], listing["data"][0]["inference_url"]) == ports


def test_manager_restart_under_a_running_unit(runtime_dir):
    with UnitProcess(runtime_dir) as unit:
        first = ManagerProcess(runtime_dir)
        try:
            with Client(first.port) as client:
                assert client.request(setup_request())["work_id"] == "llm.0"
        finally:
            assert first.stop() == 0
        with ManagerProcess(runtime_dir) as second, Client(second.port) as client:
            setup = client.request(setup_request(request_id="again"))
            assert setup["error"]["code"] == 0 and setup["work_id"] == "llm.0"
            pieces = client.stream(inference_request("llm.0", "back"))
            assert [p["data"]["delta"] for p in pieces] == ["back", "hello", ""]
            listing = client.request({"request_id": "t", "work_id": "llm", "action": "taskinfo"})
            assert listing["data"] == ["llm.0"]
        assert unit.proc.poll() is None


def test_sigterm_with_live_sessions_and_tasks_leaves_no_manager_socket(runtime_dir):
    manager = ManagerProcess(runtime_dir)
    with UnitProcess(runtime_dir) as unit:
        clients = [Client(manager.port) for _ in range(4)]
        try:
            for client in clients:
                assert client.request(setup_request())["error"]["code"] == 0
            manager.proc.send_signal(signal.SIGTERM)
            assert manager.proc.wait(10) == 0
            for client in clients:
                client.sock.settimeout(5)
                assert client.sock.recv(1) == b""
        finally:
            for client in clients:
                client.close()
            manager.stop()
        leftovers = [p for p in socket_files(runtime_dir)
                     if not p.endswith(("rpc.llm", ".output_url"))]
        assert leftovers == []
        assert unit.proc.poll() is None


def test_sigterm_while_a_unit_call_is_in_flight_exits_at_once(runtime_dir, sockets):
    mute = sockets(zmq.ROUTER)  # a unit whose RPC service takes requests and never answers
    mute.bind(f"ipc://{runtime_dir}/rpc.mute")
    with ManagerProcess(runtime_dir) as manager, Client(manager.port) as client:
        client.send({"request_id": "stuck", "work_id": "mute", "action": "taskinfo"})
        assert mute.poll(10_000), "the manager never called the unit"
        assert mute.recv_multipart()[-2] == b"taskinfo"  # the manager's REQ now waits
        started = time.monotonic()
        manager.proc.send_signal(signal.SIGTERM)
        assert manager.proc.wait(10) == 0
        assert time.monotonic() - started < 2.0
    assert [p for p in socket_files(runtime_dir) if p.endswith("rpc.sys")] == []


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _send_until_blocked(client: Client, requests, sent: list[int]) -> None:
    """Send ``requests`` one by one, counting them; stop when the manager stops reading."""
    client.sock.settimeout(3)
    try:
        for request in requests:
            client.send(request)
            sent[0] += 1
    except (TimeoutError, OSError):
        pass  # the manager no longer reads this client: its sends block


@pytest.mark.parametrize("flood", ["inference", "junk"])
def test_a_client_that_never_reads_neither_grows_the_manager_nor_stalls_others(stack, flood):
    manager, _ = stack
    with Client(manager.port) as slow, Client(manager.port) as other:
        work_id = slow.request(setup_request(request_id="slow"))["work_id"]
        other_id = other.request(setup_request(request_id="other"))["work_id"]
        before = _rss_mb(manager.proc.pid)
        if flood == "inference":  # ~150 MB of answers that the slow client never reads
            text = "x" * 20_000
            requests = (inference_request(work_id, text, request_id=f"s{i}") for i in range(2500))
        else:  # ~130 bytes of -2 answer for every 2 bytes sent
            requests = (b"x\n" * 32768 for _ in range(400))
        sent = [0]
        sender = threading.Thread(target=_send_until_blocked, args=(slow, requests, sent))
        sender.start()
        try:
            for i in range(20):  # meanwhile another session is served as usual
                pieces = other.stream(inference_request(other_id, f"o{i}", request_id=f"o{i}"))
                assert [p["data"]["delta"] for p in pieces] == [f"o{i}", "hello", ""]
                pong = other.request({"request_id": f"p{i}", "work_id": "sys", "action": "ping"})
                assert pong["request_id"] == f"p{i}"
        finally:
            sender.join(60)
        assert not sender.is_alive()
        assert sent[0] > 0
        growth = _rss_mb(manager.proc.pid) - before
        # bounded by the 1 MiB write buffer, ZeroMQ's queue (1000 pieces) and one read chunk
        assert growth < 30, f"manager grew by {growth:.0f} MB"
    with Client(manager.port) as client:  # the slow session's close freed what it held
        assert client.request({"request_id": "after", "work_id": "", "action": "ping"})["error"]["code"] == 0


def test_requests_held_for_a_dead_task_are_freed_when_they_fail(stack):
    manager, unit = stack
    with Client(manager.port) as client:
        work_id = client.request(setup_request())["work_id"]
        unit.kill()  # its subscription goes: inference requests for the task are held
        wait_until(lambda: not client.request({"request_id": "ls", "work_id": "sys",
                                               "action": "lstask"})["data"][0]["subscribed"],
                   10, "the manager saw the subscription go")  # fmt: skip
        before = _rss_mb(manager.proc.pid)
        big = "A" * 1_000_000
        for i in range(300):  # 300 MB of requests that can never be delivered
            client.send(inference_request(work_id, big, request_id=f"h{i}"))
        answers = [client.recv() for _ in range(300)]
        assert {a["error"]["code"] for a in answers} == {-4}
        assert sorted(a["request_id"] for a in answers) == sorted(f"h{i}" for i in range(300))
        growth = _rss_mb(manager.proc.pid) - before
        assert growth < 60, f"manager kept {growth:.0f} MB of failed requests"


def test_streamed_input_gets_one_answer_and_no_stray_errors(runtime_dir):
    # Units buffer pieces with finish false and answer the joined text once; the manager
    # must not wait for (and then time out) answers to the non-final pieces.
    with ManagerProcess(runtime_dir, "--request-timeout", "1") as manager, UnitProcess(runtime_dir):
        with Client(manager.port) as client:
            work_id = client.request(setup_request())["work_id"]
            pieces = [("Grü", False), ("ße ", False), ("世界", True)]
            for index, (delta, finish) in enumerate(pieces):
                client.send({"request_id": "streamed", "work_id": work_id, "action": "inference",
                             "object": "llm.utf-8.stream",
                             "data": {"delta": delta, "index": index, "finish": finish}})
            answers = [client.recv() for _ in range(3)]
            assert [a["data"]["delta"] for a in answers] == ["Grüße 世界", "hello", ""]
            assert {a["request_id"] for a in answers} == {"streamed"}
            time.sleep(2.5)  # past the 1 s request timeout: any stray error would be queued now
            pong = client.request({"request_id": "after", "work_id": "sys", "action": "ping"})
            assert (pong["request_id"], pong["error"]["code"]) == ("after", 0)
