"""The unit manager's TCP front door as a real process, with a StackFlow-style node: every
error path, the sys actions, deadlines (silent unit, unit gone mid-stream, late pieces),
concurrent sessions, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
from manager_support import (
    Client,
    ManagerProcess,
    StackFlowNode,
    inference_request,
    setup_request,
    socket_files,
)
from waits import wait_until


@pytest.fixture
def manager(runtime_dir):
    with ManagerProcess(runtime_dir) as m:
        yield m


def error_of(answer):
    return answer["error"]["code"], answer["request_id"], answer["work_id"]


def test_json_format_errors_use_request_id_0_and_work_id_sys(manager):
    with Client(manager.port) as client:
        for bad in (
            b"not json\n",
            b"[1,2,3]\n",
            b'{"work_id":"sys","action":"ping"}\n',  # no request_id
            b'{"request_id":"1","action":"ping"}\n',  # no work_id
            b'{"request_id":"1","work_id":"sys"}\n',  # no action
            b'{"request_id":1,"work_id":"sys","action":"ping"}\n',  # wrong type
            b'{"request_id":"1","work_id":["sys"],"action":"ping"}\n',
        ):
            client.send(bad)
            answer = client.recv()
            assert error_of(answer) == (-2, "0", "sys"), bad
            assert answer["error"]["message"].startswith("json format error")
            assert (answer["object"], answer["data"]) == ("None", "None")
        assert client.request({"request_id": "ok", "work_id": "sys", "action": "ping"})["error"]["code"] == 0


def test_unknown_sys_action_unknown_work_id_and_unreachable_unit(manager, runtime_dir):
    with Client(manager.port) as client:
        assert error_of(client.request({"request_id": "a", "work_id": "sys", "action": "selfdestruct"})) == (
            -3, "a", "sys")
        assert error_of(client.request({"request_id": "b", "work_id": "", "action": "nope"})) == (
            -3, "b", "sys")
        answer = client.request(inference_request("llm.7", "x", request_id="c"))
        assert error_of(answer) == (-4, "c", "llm.7")
        assert answer["error"]["message"] == "inference data push false"
        answer = client.request(setup_request(request_id="d"))  # no unit llm running
        assert error_of(answer) == (-9, "d", "llm")
        assert answer["error"]["message"].startswith("unit call false")
        answer = client.request({"request_id": "e", "work_id": "../x.1", "action": "setup"})
        assert error_of(answer) == (-9, "e", "../x.1")


def test_unit_without_the_action_answers_not_action_and_the_client_gets_9(manager, runtime_dir):
    with StackFlowNode(runtime_dir) as node, Client(manager.port) as client:
        answer = client.request({"request_id": "f", "work_id": "llm", "action": "frobnicate"})
        assert error_of(answer) == (-9, "f", "llm")
        assert node.tasks == {}


def test_sys_actions(manager, runtime_dir, tmp_path):
    with StackFlowNode(runtime_dir) as node, Client(manager.port) as client:
        ping = client.request({"request_id": "p", "work_id": "sys", "action": "ping"})
        assert (ping["error"], ping["object"], ping["data"]) == ({"code": 0, "message": ""}, "None", "None")
        version = client.request({"request_id": "v", "work_id": "sys", "action": "version"})
        assert version["object"] == "sys.utf-8" and version["data"].startswith("v")
        lsmode = client.request({"request_id": "l", "work_id": "sys", "action": "lsmode"})
        assert (lsmode["object"], lsmode["data"]) == ("sys.lsmode", [])
        hw = client.request({"request_id": "h", "work_id": "sys", "action": "hwinfo"})
        assert hw["object"] == "sys.hwinfo" and hw["work_id"] == "sys"
        assert {type(hw["data"][k]) for k in ("temperature", "cpu_loadavg", "mem")} == {int}
        assert all({"name", "ip", "speed"} <= set(eth) for eth in hw["data"]["eth_info"])
        work_id = client.request(setup_request())["work_id"]
        tasks = client.request({"request_id": "t", "work_id": "sys", "action": "lstask"})
        assert tasks["object"] == "sys.lstask"
        assert [(t["work_id"], t["unit"], t["subscribed"]) for t in tasks["data"]] == [
            (work_id, "llm", True)]
        units = client.request({"request_id": "u", "work_id": "sys", "action": "lsunit"})
        assert units["data"] == [
            {"unit": "llm", "rpc_url": f"ipc://{runtime_dir}/rpc.llm", "tasks": [work_id],
             "registered": False}]  # a StackFlow node serves rpc.llm without registering
        call = client.request({"request_id": "c", "work_id": "sys", "action": "unit_call",
                               "object": "llm.list_action", "data": ""})
        assert call["object"] == "llm.list_action" and "setup" in call["data"]["actions"]
        assert node.tasks


def test_lsmode_lists_model_files(runtime_dir, tmp_path):
    (tmp_path / "mode_a.json").write_text(json.dumps({"mode": "a", "type": "llm"}))
    (tmp_path / "broken.json").write_text("{")
    with ManagerProcess(runtime_dir, "--lsmod-dir", str(tmp_path)) as m, Client(m.port) as client:
        lsmode = client.request({"request_id": "l", "work_id": "sys", "action": "lsmode"})
        assert lsmode["data"] == [{"mode": "a", "type": "llm"}]


def test_sys_config_json_in_the_working_directory_is_read(runtime_dir, tmp_path):
    (tmp_path / "sys_config.json").write_text(json.dumps({"config_work_id": 1000}))
    with ManagerProcess(runtime_dir, cwd=str(tmp_path)) as m:
        with StackFlowNode(runtime_dir) as node, Client(m.port) as client:
            assert client.request(setup_request())["work_id"] == "llm.1000"
            assert node.tasks


def test_a_silent_unit_gets_the_client_an_error_and_late_pieces_are_dropped(runtime_dir):
    with ManagerProcess(runtime_dir, "--request-timeout", "1") as m:
        with StackFlowNode(runtime_dir, piece_delay=1.6) as node, Client(m.port) as client:
            work_id = client.request(setup_request())["work_id"]
            client.send(inference_request(work_id, "slow", request_id="r1"))
            first = client.recv()
            assert first["data"]["delta"] == "slow"
            error = client.recv()  # the next piece is 1.6 s away; the deadline is 1 s
            assert error_of(error) == (-9, "r1", work_id)
            assert "no answer" in error["error"]["message"]
            # once the node has sent everything, only new answers reach the client
            wait_until(lambda: _sent(node) >= 3, timeout=10)
            ping = client.request({"request_id": "after", "work_id": "sys", "action": "ping"})
            assert ping["request_id"] == "after"


def _sent(node):
    return sum(task.sent for task in node.tasks.values())


def test_a_node_that_never_answers_gets_an_error_within_the_deadline(runtime_dir):
    with ManagerProcess(runtime_dir, "--request-timeout", "0.5") as m:
        with StackFlowNode(runtime_dir, silent=True), Client(m.port) as client:
            work_id = client.request(setup_request())["work_id"]
            for i in range(3):
                answer = client.request(inference_request(work_id, "x", request_id=f"q{i}"))
                assert error_of(answer) == (-9, f"q{i}", work_id)


def test_unit_going_away_mid_stream_answers_the_client_at_once(runtime_dir):
    # The request deadline is long: only the lost subscription can produce the error.
    with ManagerProcess(runtime_dir, "--request-timeout", "120") as m, Client(m.port) as client:
        node = StackFlowNode(runtime_dir, piece_delay=0.3)
        try:
            work_id = client.request(setup_request())["work_id"]
            client.send(inference_request(work_id, "bye", request_id="k1"))
            assert client.recv()["data"]["delta"] == "bye"
        finally:
            node.close()  # the node's sockets close mid-stream, as when its process dies
        answers = [client.recv()]
        while answers[-1]["error"]["code"] == 0:
            answers.append(client.recv())
        assert error_of(answers[-1]) == (-9, "k1", work_id)
        assert "went away" in answers[-1]["error"]["message"]


def test_concurrent_sessions_all_served(manager, runtime_dir):
    results: dict[int, list] = {}

    def session(n: int) -> None:
        with Client(manager.port) as client:
            work_id = client.request(setup_request(request_id=f"s{n}"))["work_id"]
            out = []
            for i in range(15):
                pieces = client.stream(inference_request(work_id, f"{n}-{i}", request_id=f"{n}/{i}"))
                out.append([p["data"]["delta"] for p in pieces])
            client.request({"request_id": "x", "work_id": work_id, "action": "exit"})
            results[n] = out

    with StackFlowNode(runtime_dir):
        threads = [threading.Thread(target=session, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(results) == list(range(8))
    for n, out in results.items():
        assert out == [[f"{n}-{i}", "hello", ""] for i in range(15)]


def _node_file(path: str) -> bool:
    """Socket files the node binds itself (its RPC and its tasks' output urls)."""
    return path.endswith(("rpc.llm", ".output_url"))


def test_sigterm_closes_sessions_and_removes_every_socket_file(runtime_dir):
    m = ManagerProcess(runtime_dir)
    node = StackFlowNode(runtime_dir)
    clients = [Client(m.port) for _ in range(3)]
    try:
        clients[0].request(setup_request())
        for n, client in enumerate(clients[1:]):  # a unit answers them: their PULLs are bound
            client.request({"request_id": f"t{n}", "work_id": "llm", "action": "taskinfo"})
        ours = [p for p in socket_files(runtime_dir) if not _node_file(p)]
        assert len(ours) == 5  # rpc.sys, one inference url, three sessions
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(10) == 0
        for client in clients:  # every session is closed by the manager
            client.sock.settimeout(5)
            assert client.sock.recv(1) == b""
        assert [p for p in socket_files(runtime_dir) if not _node_file(p)] == []
    finally:
        for client in clients:
            client.close()
        node.close()
        m.stop()


def test_second_manager_on_the_same_runtime_dir_refuses_to_start(manager, runtime_dir):
    with pytest.raises(RuntimeError):
        ManagerProcess(runtime_dir)
    assert os.path.exists(f"{runtime_dir}/rpc.sys")
    with Client(manager.port) as client:
        assert client.request({"request_id": "p", "work_id": "sys", "action": "ping"})["error"]["code"] == 0


def test_connection_churn_leaks_no_descriptors_or_socket_files(manager, runtime_dir):
    def fds() -> int:
        return len(os.listdir(f"/proc/{manager.proc.pid}/fd"))

    def session_files() -> list[str]:
        return [p for p in socket_files(runtime_dir) if p.endswith(".sock")]

    unit_call = {"work_id": "nobody", "action": "taskinfo"}  # binds the session's PULL, then -9
    with Client(manager.port) as first:  # stays open: the baseline includes one session
        assert first.request({"request_id": "w", **unit_call})["error"]["code"] == -9
        baseline = fds()
        for i in range(200):
            with Client(manager.port) as client:
                if i % 3 == 1:
                    answer = client.request({"request_id": str(i), "work_id": "sys", "action": "ping"})
                    assert answer["request_id"] == str(i)
                elif i % 3 == 2:
                    answer = client.request({"request_id": str(i), **unit_call})
                    assert (answer["request_id"], answer["error"]["code"]) == (str(i), -9)
        wait_until(lambda: session_files() == [f"{runtime_dir}/llm/8000.sock"])
        wait_until(lambda: fds() <= baseline)  # ZeroMQ releases closed sockets' fds lazily
        assert first.request({"request_id": "z", "work_id": "sys", "action": "ping"})["request_id"] == "z"


def test_open_requests_per_connection_are_capped(runtime_dir):
    from edgellm.manager.dispatch import MAX_OPEN_REQUESTS

    with ManagerProcess(runtime_dir, "--request-timeout", "60") as m:
        with StackFlowNode(runtime_dir, silent=True), Client(m.port) as client:
            work_id = client.request(setup_request())["work_id"]
            batch = b"".join(
                json.dumps(inference_request(work_id, "x", request_id=f"f{i}")).encode() + b"\n"
                for i in range(MAX_OPEN_REQUESTS + 2)
            )
            client.send(batch)
            refused = [client.recv(), client.recv()]
            assert [(a["error"]["code"], a["request_id"]) for a in refused] == [
                (-4, f"f{MAX_OPEN_REQUESTS}"), (-4, f"f{MAX_OPEN_REQUESTS + 1}")]
            # sys actions are still answered
            assert client.request({"request_id": "p", "work_id": "sys", "action": "ping"})["request_id"] == "p"


def test_without_tcp_only_the_sys_service_runs(runtime_dir):
    import subprocess
    import sys as _sys

    from manager_support import _read_line_until

    proc = subprocess.Popen(
        [_sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING", "unit-manager",
         "--no-tcp", "--runtime-dir", runtime_dir],
        stdout=subprocess.PIPE, bufsize=0,
    )
    try:
        assert "(tcp disabled)" in _read_line_until(proc, "listening on", 20)
        with StackFlowNode(runtime_dir) as node:
            assert node.unit_call("sys", "register_unit", "llm").startswith(b"\x010")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert socket_files(runtime_dir) == []
