"""RPC in process: the thread and asyncio adapters over one core, raw REQ peers like the
C++ ones, errors as the clients see them, the liveness probe."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest
import zmq

from edgellm.comm.errors import CommError, RpcRemoteError, RpcTimeout, RpcUnavailable
from edgellm.comm.rpc import RpcDispatcher
from edgellm.comm.rpc_asyncio import AsyncRpcClient, AsyncRpcServer
from edgellm.comm.rpc_thread import RpcClient, RpcServer, probe, wait_for_service
from edgellm.protocol.rpc import ERROR_MARK, NOT_ACTION

pytestmark = pytest.mark.usefixtures("no_endpoint_left")


def _service() -> RpcDispatcher:
    def boom(data: bytes) -> bytes:
        raise RuntimeError("bug in " + data.decode())

    return RpcDispatcher({"echo": lambda data: data, "upper": lambda data: data.decode().upper(),
                          "boom": boom})  # fmt: skip


def test_call_list_action_and_not_action(runtime_dir):
    with RpcServer("svc", _service(), runtime_dir=runtime_dir):
        with RpcClient("svc", runtime_dir=runtime_dir) as client:
            assert client.call("echo", b"abc") == b"abc"
            assert client.call("upper", "abc") == b"ABC"
            assert client.call("nope", b"") == NOT_ACTION
            actions = json.loads(client.call("list_action"))["actions"]
            assert set(actions) == {"list_action", "echo", "upper", "boom"}
    assert not os.path.exists(os.path.join(runtime_dir, "rpc.svc"))


def test_raw_req_peer_like_cpp_gets_one_frame_reply(runtime_dir, sockets):
    with RpcServer("svc", _service(), runtime_dir=runtime_dir) as server:
        req = sockets(zmq.REQ)
        req.connect(server.url)
        req.send_multipart([b"echo", b"data"])
        assert req.poll(3000)
        assert req.recv_multipart() == [b"data"]
        # A one-frame request is malformed: it still gets an answer, the server lives on.
        req.send(b"echo")
        assert req.poll(3000)
        assert req.recv_multipart() == [NOT_ACTION]


def test_a_crashing_handler_answers_an_error_report_and_keeps_serving(runtime_dir, sockets, caplog):
    with RpcServer("svc", _service(), runtime_dir=runtime_dir) as server:
        with RpcClient("svc", runtime_dir=runtime_dir) as client:
            with pytest.raises(RpcRemoteError, match="boom: RuntimeError: bug in x"):
                client.call("boom", b"x")
            assert client.call("echo", b"y") == b"y"
        req = sockets(zmq.REQ)  # what a C++ caller receives: one frame, the report
        req.connect(server.url)
        req.send_multipart([b"boom", b"z"])
        assert req.poll(3000)
        assert req.recv() == ERROR_MARK + b"boom: RuntimeError: bug in z"
    assert "Traceback" in caplog.text and "bug in x" in caplog.text


def test_missing_service_fails_fast(runtime_dir):
    with RpcClient("absent", runtime_dir=runtime_dir) as client:
        t0 = time.monotonic()
        with pytest.raises(RpcUnavailable):
            client.call("x")
        assert time.monotonic() - t0 < 1.0


def test_silent_service_times_out_then_client_recovers(runtime_dir):
    release = threading.Event()

    def slow(data: bytes) -> bytes:
        release.wait(5)
        return b"late"

    dispatcher = RpcDispatcher({"slow": slow, "fast": lambda d: b"fast"})
    with RpcServer("svc", dispatcher, runtime_dir=runtime_dir):
        with RpcClient("svc", runtime_dir=runtime_dir, timeout=0.2) as client:
            with pytest.raises(RpcTimeout):
                client.call("slow")
            release.set()
            # The REQ socket was replaced: the late reply is not mistaken for this one.
            assert client.call("fast", timeout=3) == b"fast"


def test_a_closed_client_refuses_calls(runtime_dir):
    client = RpcClient("svc", runtime_dir=runtime_dir)
    client.close()
    with pytest.raises(CommError, match="closed"):
        client.call("x")


def test_probe_tells_a_live_service_from_a_stale_file(runtime_dir, sockets):
    assert probe("svc", runtime_dir=runtime_dir) is None  # no file
    with RpcServer("svc", _service(), runtime_dir=runtime_dir):
        assert probe("svc", runtime_dir=runtime_dir) == ["list_action", "echo", "upper", "boom"]
    mute = sockets(zmq.ROUTER)  # bound, never answers: what a dead process's file is like
    mute.bind(f"ipc://{runtime_dir}/rpc.mute")
    t0 = time.monotonic()
    assert probe("mute", runtime_dir=runtime_dir, timeout=0.2) is None
    assert time.monotonic() - t0 < 1.0


def test_wait_for_service(runtime_dir):
    server = RpcServer("late", RpcDispatcher({"a": lambda d: b""}), runtime_dir=runtime_dir)
    timer = threading.Timer(0.2, server.start)
    timer.start()
    try:
        assert "a" in wait_for_service("late", runtime_dir=runtime_dir, timeout=10)
    finally:
        timer.join()
        server.stop()
    with pytest.raises(RpcTimeout):
        wait_for_service("never", runtime_dir=runtime_dir, timeout=0.1)


def test_asyncio_server_and_client_on_one_loop(runtime_dir):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = AsyncRpcServer(loop, "svc", _service(), runtime_dir=runtime_dir).start()
        client = AsyncRpcClient("svc", runtime_dir=runtime_dir)
        try:
            # Concurrent calls each get their own REQ socket: all answered, in any order.
            replies = await asyncio.gather(*[client.call("echo", str(i)) for i in range(20)])
            assert replies == [str(i).encode() for i in range(20)]
            assert await client.call("nope") == NOT_ACTION
            with pytest.raises(RpcRemoteError, match="boom: RuntimeError"):
                await client.call("boom", "a")
        finally:
            client.close()
            server.close()
        with pytest.raises(RpcUnavailable):
            await AsyncRpcClient("svc", runtime_dir=runtime_dir).call("echo")

    asyncio.run(main())


def test_asyncio_client_times_out_and_close_ends_calls_in_flight(runtime_dir, sockets):
    mute = sockets(zmq.ROUTER)
    mute.bind(f"ipc://{runtime_dir}/rpc.mute")

    async def main() -> None:
        client = AsyncRpcClient("mute", runtime_dir=runtime_dir, timeout=0.1)
        with pytest.raises(RpcTimeout):
            await client.call("x")
        call = asyncio.ensure_future(client.call("x", timeout=30))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, mute.poll, 5000)  # the call is waiting now
        client.close()
        with pytest.raises(CommError, match="closed"):
            await asyncio.wait_for(call, 5)

    asyncio.run(main())
