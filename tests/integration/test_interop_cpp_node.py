"""Interop: a StackFlow-style node speaking the C++ wire (raw pyzmq, byte-faithful to
``pzmq.hpp`` / ``StackFlow.cpp`` / ``node/test``) registers with this project's unit manager
and serves clients through it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from manager_support import (
    Client,
    ManagerProcess,
    StackFlowNode,
    inference_request,
    setup_request,
)
from waits import wait_until

from edgellm.protocol.params import get_param


@pytest.fixture
def manager(runtime_dir):
    with ManagerProcess(runtime_dir) as m:
        yield m


def test_sys_rpc_replies_are_byte_exact(manager, runtime_dir):
    with StackFlowNode(runtime_dir, "asr") as node:
        reply = node.unit_call("sys", "register_unit", "asr")
        llm = f"ipc://{runtime_dir}/llm/"
        out_url = f"{llm}5010.sock.asr.output_url".encode()
        inf_url = f"{llm}5011.sock.asr.inference_url".encode()
        inner = bytes([len(out_url)]) + out_url + inf_url
        assert reply == b"\x010" + inner
        second = node.unit_call("sys", "register_unit", "asr")
        assert get_param(second, 0) == b"1"
        assert get_param(get_param(second, 1), 0).endswith(b"5012.sock.asr.output_url")
        assert node.unit_call("sys", "sql_select", "asr.0.out_port") == out_url
        assert node.unit_call("sys", "sql_select", "nothing") == b""
        assert node.unit_call("sys", "sql_set", json.dumps({"key": "k", "val": "v"})) == b"Success"
        assert node.unit_call("sys", "sql_set", json.dumps({"key": "", "val": "v"})) == b"False"
        assert node.unit_call("sys", "sql_set", "not json") == b"False"
        assert node.unit_call("sys", "sql_select", "k") == b"v"
        assert node.unit_call("sys", "sql_unset", "k") == b"Success"
        assert node.unit_call("sys", "sql_select", "k") == b""
        assert node.unit_call("sys", "release_unit", "asr.0") == b"Success"
        assert node.unit_call("sys", "sql_select", "asr.0.out_port") == b""
        assert node.unit_call("sys", "release_unit", "asr.99") == b"Success"
        # the freed ports are handed out again, lowest first; work ids keep counting
        third = node.unit_call("sys", "register_unit", "asr")
        assert get_param(third, 0) == b"2"
        assert get_param(get_param(third, 1), 0) == out_url
        assert node.unit_call("sys", "no_such_action", "") == b"NotAction"
        actions = json.loads(node.unit_call("sys", "list_action", ""))["actions"]
        assert {"register_unit", "release_unit", "sql_select", "sql_set", "sql_unset"} <= set(actions)


def test_cpp_style_node_serves_the_sample_session(manager, runtime_dir):
    with StackFlowNode(runtime_dir) as node, Client(manager.port) as client:
        setup = client.request(setup_request())
        assert setup["error"] == {"code": 0, "message": ""}
        assert (setup["request_id"], setup["work_id"], setup["object"], setup["data"]) == (
            "llm_001", "llm.0", "None", "None")
        request = inference_request("llm.0", "hi there")
        pieces = client.stream(request)
        assert [p["data"] for p in pieces] == [
            {"delta": "hi there", "finish": False, "index": 0},
            {"delta": "hello", "finish": False, "index": 1},
            {"delta": "", "finish": True, "index": 2},
        ]
        assert all(p["request_id"] == "llm_001" and p["work_id"] == "llm.0" for p in pieces)
        # what the node received: zmq_com first, then the client's bytes after "{"
        original = json.dumps(request, ensure_ascii=False).encode()
        prefix = f'{{"zmq_com":"ipc://{runtime_dir}/llm/8000.sock",'.encode()
        assert node.inbox[-1] == prefix + original[1:]
        info = client.request({"request_id": "t", "work_id": "llm.0", "action": "taskinfo"})
        assert info["object"] == "llm.taskinfo" and info["data"]["model"].startswith("DeepSeek")
        tasks = client.request({"request_id": "t2", "work_id": "llm", "action": "taskinfo"})
        assert tasks["data"] == ["llm.0"]
        bye = client.request({"request_id": "llm_exit", "work_id": "llm.0", "action": "exit"})
        assert bye["error"]["code"] == 0 and bye["work_id"] == "llm.0"


def test_a_client_cannot_redirect_answers_with_its_own_zmq_com(manager, runtime_dir):
    with StackFlowNode(runtime_dir) as node, Client(manager.port) as client:
        work_id = client.request(setup_request())["work_id"]
        request = inference_request(work_id, "x")
        request["zmq_com"] = f"ipc://{runtime_dir}/llm/9999.sock"
        pieces = client.stream(request)
        assert pieces[-1]["data"]["finish"] is True
        received = json.loads(node.inbox[-1])
        assert received["zmq_com"] == f"ipc://{runtime_dir}/llm/8000.sock"
        assert node.inbox[-1].count(b"zmq_com") == 1


def test_unit_sockets_and_session_sockets_are_owner_only(manager, runtime_dir):
    import stat

    with StackFlowNode(runtime_dir) as node, Client(manager.port) as client:
        client.request(setup_request())
        mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
        assert mode(f"{runtime_dir}/llm") == 0o700
        assert mode(f"{runtime_dir}/rpc.sys") == 0o600
        assert mode(f"{runtime_dir}/llm/8000.sock") == 0o600
        assert mode(f"{runtime_dir}/llm/5011.sock.llm.inference_url") == 0o600
        assert node.tasks


def test_inference_sent_right_after_setup_is_not_lost_to_the_slow_joiner(manager, runtime_dir):
    """The task's SUB connects late (as a busy C++ node may): a plain PUB would drop the
    first inference; the manager holds it until the subscription arrives."""
    with StackFlowNode(runtime_dir, subscribe_delay=0.5) as node, Client(manager.port) as client:
        work_id = client.request(setup_request())["work_id"]
        pieces = client.stream(inference_request(work_id, "first"))
        assert [p["data"]["delta"] for p in pieces] == ["first", "hello", ""]
        assert len(node.inbox) == 1


# -- a real C++ node (tests/interop/stackflow_node.cpp, libzmq C API) -------------------------

CPP_SOURCE = os.path.join(os.path.dirname(__file__), "..", "interop", "stackflow_node.cpp")


@pytest.fixture(scope="module")
def cpp_node_binary(tmp_path_factory):
    """Compile the C++ node once; needs g++ and libzmq's headers (apt: libzmq3-dev)."""
    if shutil.which("g++") is None or not os.path.exists("/usr/include/zmq.h"):
        pytest.skip("g++ and libzmq3-dev are needed to build the C++ node")
    binary = str(tmp_path_factory.mktemp("cpp") / "stackflow_node")
    subprocess.run(
        ["g++", "-std=c++17", "-O1", "-pthread", "-o", binary, CPP_SOURCE, "-lzmq"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return binary


def test_real_cpp_node_registers_and_serves_through_the_manager(cpp_node_binary, runtime_dir):
    node = subprocess.Popen([cpp_node_binary, runtime_dir, "llm"], stdout=subprocess.PIPE)
    try:
        assert node.stdout.readline().strip() == b"node ready"
        with ManagerProcess(runtime_dir, "--request-timeout", "1") as manager, \
                Client(manager.port) as client:
            setup = client.request(setup_request())
            assert (setup["error"]["code"], setup["request_id"], setup["work_id"]) == (0, "llm_001", "llm.0")
            for text in ("hi", 'quote " and \\ backslash'):
                pieces = client.stream(inference_request("llm.0", text))
                assert [p["data"] for p in pieces] == [
                    {"delta": text, "finish": False, "index": 0},
                    {"delta": "hello", "finish": False, "index": 1},
                    {"delta": "", "finish": True, "index": 2},
                ]
            tasks = client.request({"request_id": "t", "work_id": "llm", "action": "taskinfo"})
            assert (tasks["object"], tasks["data"]) == ("llm.tasklist", ["llm.0"])
            # upstream's error envelope: the last RPC action's request_id, the unit's name
            empty = client.request(inference_request("llm.0", "", request_id="empty"))
            assert (empty["error"]["code"], empty["request_id"], empty["work_id"]) == (-24, "t", "llm")
            # ... and it ends the inference it answers: no -9 comes at the 1 s deadline
            time.sleep(1.5)
            pong = client.request({"request_id": "p", "work_id": "sys", "action": "ping"})
            assert (pong["request_id"], pong["error"]["code"]) == ("p", 0)
            bad = client.request({"request_id": "b", "work_id": "llm", "action": "frobnicate"})
            assert bad["error"]["code"] == -9
            bye = client.request({"request_id": "llm_exit", "work_id": "llm.0", "action": "exit"})
            assert (bye["error"]["code"], bye["work_id"]) == (0, "llm.0")
            # Upstream's node answers exit, then calls sys release_unit: wait for the release
            # (a request sent in between meets a task whose unit already left it).
            wait_until(lambda: "llm.0" not in [
                t["work_id"] for t in client.request({"request_id": "l", "work_id": "sys",
                                                      "action": "lstask"})["data"]], 10)  # fmt: skip
            gone = client.request(inference_request("llm.0", "x", request_id="late"))
            assert gone["error"]["code"] == -4  # released through sys release_unit
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        node.stdout.close()
