import json
import os
import threading
import time

import pytest
import zmq

from edgellm.comm.rpc import (
    NOT_ACTION,
    RpcClient,
    RpcDispatcher,
    RpcServer,
    RpcTimeout,
    RpcUnavailable,
    wait_for_service,
)


@pytest.fixture
def runtime_dir(tmp_path):
    return str(tmp_path)


def test_call_list_action_and_not_action(runtime_dir):
    disp = RpcDispatcher({"echo": lambda data: data, "upper": lambda data: data.decode().upper()})
    with RpcServer("svc", disp, runtime_dir=runtime_dir):
        with RpcClient("svc", runtime_dir=runtime_dir) as client:
            assert client.call("echo", b"abc") == b"abc"
            assert client.call("upper", "abc") == b"ABC"
            assert client.call("nope", b"") == NOT_ACTION
            actions = json.loads(client.call("list_action"))["actions"]
            assert set(actions) == {"list_action", "echo", "upper"}
    assert not os.path.exists(os.path.join(runtime_dir, "rpc.svc"))


def test_raw_req_peer_like_cpp_gets_one_frame_reply(runtime_dir):
    ctx = zmq.Context.instance()
    with RpcServer("svc", RpcDispatcher({"a": lambda d: b"ok:" + d}), runtime_dir=runtime_dir) as srv:
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(srv.url)
        req.send(b"a", zmq.SNDMORE)
        req.send(b"data")
        assert req.poll(3000)
        assert req.recv_multipart() == [b"ok:data"]
        # A one-frame request is malformed: it still gets an answer, the server lives on.
        req.send(b"a")
        assert req.poll(3000)
        assert req.recv_multipart() == [NOT_ACTION]
        req.close()


def test_handler_exception_answers_and_keeps_serving(runtime_dir):
    def boom(data):
        raise RuntimeError("bug")

    with RpcServer("svc", RpcDispatcher({"boom": boom, "ok": lambda d: b"y"}), runtime_dir=runtime_dir):
        with RpcClient("svc", runtime_dir=runtime_dir) as client:
            assert client.call("boom") == NOT_ACTION
            assert client.call("ok") == b"y"


def test_missing_service_fails_fast(runtime_dir):
    with RpcClient("absent", runtime_dir=runtime_dir) as client:
        t0 = time.monotonic()
        with pytest.raises(RpcUnavailable):
            client.call("x")
        assert time.monotonic() - t0 < 1.0


def test_silent_service_times_out_then_client_recovers(runtime_dir):
    release = threading.Event()

    def slow(data):
        release.wait(5)
        return b"late"

    with RpcServer("svc", RpcDispatcher({"slow": slow, "fast": lambda d: b"fast"}), runtime_dir=runtime_dir):
        with RpcClient("svc", runtime_dir=runtime_dir, timeout=0.2) as client:
            with pytest.raises(RpcTimeout):
                client.call("slow")
            release.set()
            # The REQ socket was replaced: the late reply is not mistaken for this one.
            assert client.call("fast", timeout=3) == b"fast"


def test_wait_for_service(runtime_dir):
    server = RpcServer("late", RpcDispatcher({"a": lambda d: b""}), runtime_dir=runtime_dir)
    timer = threading.Timer(0.2, server.start)
    timer.start()
    try:
        assert "a" in wait_for_service("late", runtime_dir=runtime_dir, timeout=10)
    finally:
        timer.join()
        server.stop()
