"""The unit manager's dispatch in process: a real unit registry (XPUB endpoints), units'
RPC services on the same asyncio loop, a recording link for the client, a fixed clock."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import zmq

from edgellm.comm.rpc import RpcDispatcher
from edgellm.comm.rpc_asyncio import AsyncRpcServer
from edgellm.manager.config import ManagerConfig
from edgellm.manager.dispatch import Dispatcher
from edgellm.manager.pending import PendingTable
from edgellm.manager.store import KeyValueStore
from edgellm.manager.sysinfo import HwInfo
from edgellm.manager.units import UnitRegistry
from edgellm.protocol.framing import Frame
from edgellm.protocol.params import split_params

pytestmark = pytest.mark.usefixtures("no_endpoint_left")

CREATED = 1_700_000_000


class Link:
    """The client connection: what dispatch sends it, decoded."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client_url: str):
        self.client_url = client_url
        self.sent: list[dict[str, Any]] = []
        self.pending = PendingTable(loop, 5.0, lambda p, reason: None)

    def send(self, data: bytes) -> None:
        assert data.endswith(b"\n")
        self.sent.append(json.loads(data))


def frame(**request: Any) -> Frame:
    raw = json.dumps(request).encode()
    return Frame(raw, json.loads(raw))


def run(runtime_dir: str, test) -> None:
    """``await test(dispatcher, link, registry)`` on a fresh loop, everything closed after."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        config = ManagerConfig(runtime_dir=runtime_dir, rpc_timeout=0.5, box_name="box")
        store = KeyValueStore({})
        registry = UnitRegistry(config, loop, store)
        dispatcher = Dispatcher(config, registry, store, HwInfo(), lambda: CREATED + 0.9)
        link = Link(loop, config.client_url(8000))
        try:
            await test(dispatcher, link, registry)
        finally:
            link.pending.close()
            dispatcher.close()
            registry.close()

    asyncio.run(main())


async def answer(dispatcher: Dispatcher, link: Link, **request: Any) -> dict[str, Any]:
    call = dispatcher.handle(link, frame(**request))
    if call is not None:
        await call
    return link.sent.pop()


def test_malformed_requests_are_error_2_as_request_0_of_sys(runtime_dir):
    async def test(dispatcher, link, registry):
        got = await answer(dispatcher, link, request_id=1, work_id="llm", action="setup")
        hint = "json format error: request_id, work_id and action must be strings"
        assert got == {"created": CREATED, "data": "None", "object": "None", "request_id": "0",
                       "work_id": "sys", "error": {"code": -2, "message": hint}}  # fmt: skip

    run(runtime_dir, test)


def test_sys_actions_are_answered_here(runtime_dir):
    async def test(dispatcher, link, registry):
        pong = await answer(dispatcher, link, request_id="p", work_id="", action="ping")
        assert (pong["work_id"], pong["error"]["code"], pong["created"]) == ("sys", 0, CREATED)
        version = await answer(dispatcher, link, request_id="v", work_id="sys", action="version")
        assert version["object"] == "sys.utf-8" and version["data"].startswith("v")
        registry.register("llm")
        tasks = await answer(dispatcher, link, request_id="t", work_id="sys", action="lstask")
        assert [t["work_id"] for t in tasks["data"]] == ["llm.0"]
        nope = await answer(dispatcher, link, request_id="n", work_id="sys", action="frobnicate")
        assert nope["error"] == {"code": -3, "message": "action match false"}

    run(runtime_dir, test)


def test_inference_is_published_with_the_clients_zmq_com_first(runtime_dir, sockets):
    async def test(dispatcher, link, registry):
        task = registry.register("llm")
        missing = await answer(dispatcher, link, request_id="x", work_id="llm.9",
                               action="inference", data="hi")  # fmt: skip
        assert missing["error"]["code"] == -4
        # Before the unit subscribed the request is held; it goes out once it does.
        held = frame(request_id="q", work_id="llm.0", action="inference", object="llm.utf-8",
                     zmq_com="ipc:///elsewhere", data="hi")  # fmt: skip
        assert dispatcher.handle(link, held) is None
        sub = sockets(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(task.inference_url)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, sub.poll, 5000)
        published = json.loads(sub.recv())
        assert list(published)[0] == "zmq_com" and published["zmq_com"] == link.client_url
        assert (published["request_id"], published["data"]) == ("q", "hi")
        assert len(link.pending) == 1  # open until the unit's terminal answer
        assert link.sent == []

    run(runtime_dir, test)


def test_unit_calls_and_how_they_fail(runtime_dir):
    received: list[tuple[bytes, bytes]] = []

    def setup(data: bytes) -> bytes:
        received.append(split_params(data))
        return b"None"

    def crash(data: bytes) -> bytes:
        raise RuntimeError("bad state")

    async def test(dispatcher, link, registry):
        unit = AsyncRpcServer(asyncio.get_running_loop(), "llm",
                              RpcDispatcher({"setup": setup, "pause": crash}),
                              runtime_dir=runtime_dir).start()  # fmt: skip
        try:
            call = dispatcher.handle(link, frame(request_id="s", work_id="llm", action="setup",
                                                 data={"model": "m"}))  # fmt: skip
            await call
            assert link.sent == [] and len(link.pending) == 1  # the unit answers by PUSH
            url, raw = received[0]
            assert url.decode() == link.client_url and json.loads(raw)["request_id"] == "s"
            crashed = await answer(dispatcher, link, request_id="c", work_id="llm.0",
                                   action="pause")  # fmt: skip
            assert crashed["error"]["code"] == -9
            assert "pause: RuntimeError: bad state" in crashed["error"]["message"]
            no_action = await answer(dispatcher, link, request_id="w", work_id="llm.0",
                                     action="work")  # fmt: skip
            assert no_action["error"]["message"] == \
                "unit call false: unit 'llm' has no action 'work'"
        finally:
            unit.close()
        gone = await answer(dispatcher, link, request_id="g", work_id="llm", action="setup")
        assert gone["error"]["code"] == -9 and "no RPC service" in gone["error"]["message"]
        bad = await answer(dispatcher, link, request_id="b", work_id="a/b.1", action="setup")
        assert bad["error"]["message"] == "unit call false: no unit named 'a/b'"

    run(runtime_dir, test)


def test_unit_call_of_sys_hands_the_reply_back_as_data(runtime_dir):
    async def test(dispatcher, link, registry):
        unit = AsyncRpcServer(asyncio.get_running_loop(), "llm",
                              RpcDispatcher({"stats": lambda data: b'{"n": 1}'}),
                              runtime_dir=runtime_dir).start()  # fmt: skip
        try:
            got = await answer(dispatcher, link, request_id="u", work_id="sys",
                               action="unit_call", object="llm.stats", data={})  # fmt: skip
            assert (got["object"], got["data"]) == ("llm.stats", {"n": 1})
            bad = await answer(dispatcher, link, request_id="u", work_id="sys",
                               action="unit_call", object="nodot")  # fmt: skip
            assert bad["error"]["code"] == -2
        finally:
            unit.close()

    run(runtime_dir, test)
