"""The controller's control thread in process, without a Unit: its own hooks, an in-process
sys service and a raw PULL standing for the client. Every action, the threads hooks run
on, and that a hook's crash is answered, never left for the client to time out."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import zmq

from edgellm.comm.rpc import RpcDispatcher
from edgellm.comm.rpc_thread import RpcServer
from edgellm.comm.sys_client import SysClient
from edgellm.protocol import sys_rpc
from edgellm.protocol.errors import ErrorCode
from edgellm.unit import UnitConfig, UnitError
from edgellm.unit.control import Control, Hooks

pytestmark = pytest.mark.usefixtures("no_endpoint_left")

CREATED = 1_700_000_000


class FakeSys(RpcServer):
    """register_unit / release_unit / sql_select, recording every call."""

    def __init__(self, runtime_dir: str):
        self.calls: list[tuple[str, str]] = []
        self.store: dict[str, str] = {}
        self._runtime_dir = runtime_dir
        self._next = 0
        super().__init__("sys", RpcDispatcher({
            "register_unit": self._register, "release_unit": self._release,
            "sql_select": lambda data: self.store.get(data.decode(), "").encode(),
        }), runtime_dir=runtime_dir)  # fmt: skip

    def _register(self, data: bytes) -> bytes:
        unit, n = data.decode(), self._next
        self._next += 1
        self.calls.append(("register_unit", unit))
        base = f"ipc://{self._runtime_dir}/llm/{n}"
        self.store[f"{unit}.{n}.out_port"] = f"{base}.out"
        return sys_rpc.encode_registration(n, f"{base}.out", f"{base}.inf")

    def _release(self, data: bytes) -> bytes:
        self.calls.append(("release_unit", data.decode()))
        return sys_rpc.SUCCESS


class Recorder:
    """Hooks that record what ran, on which thread; ``fail`` makes one of them raise."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []
        self.fail: dict[str, BaseException] = {}

    def _note(self, hook: str) -> None:
        self.ran.append((hook, threading.current_thread().name))
        if hook in self.fail:
            raise self.fail[hook]

    def hooks(self) -> Hooks:
        return Hooks(
            setup_task=lambda task, object_, data: self._note("setup_task"),
            exit_task=lambda task: self._note("exit_task"),
            task_info=lambda task: (self._note("task_info"), {"model": task.config.model})[1],
            pause_task=lambda task, data: self._note("pause_task"),
            work_task=lambda task, data: self._note("work_task"),
            unit_action=self._unit_action,
            handle_message=lambda task, source, raw: self._note("handle_message"),
        )

    def _unit_action(self, action: str, work_id: str, data: Any) -> tuple[str, Any]:
        self._note("unit_action")
        return f"echo.{action}", {"work_id": work_id, "data": data}


@pytest.fixture
def rig(runtime_dir, sockets):
    # Nobody publishes on the fake inference urls: do not wait for them to connect.
    config = UnitConfig(name="echo", runtime_dir=runtime_dir, sys_retry_deadline=2,
                        stop_timeout=2, subscribe_timeout=0.05)  # fmt: skip
    recorder = Recorder()
    client = sockets(zmq.PULL)  # the client's zmq_com
    client_url = f"ipc://{runtime_dir}/client.sock"
    client.bind(client_url)
    with FakeSys(runtime_dir) as fake_sys:
        control = Control(config, recorder.hooks(), SysClient(runtime_dir=runtime_dir),
                          extra_actions=("stats",), clock=lambda: CREATED)  # fmt: skip
        control.start()

        def ask(action: str, **request: Any) -> dict[str, Any]:
            body = {"request_id": "r", "work_id": "echo", **request}
            assert control.put(action, client_url, json.dumps(body).encode())
            assert client.poll(10_000), f"no answer to {action}"
            return json.loads(client.recv())

        yield control, recorder, fake_sys, ask
        assert control.stop(5)
        tasks, ending = control.take_tasks()
        for task in tasks + ending:
            task.channel.stop(2)


SETUP = {"model": "m", "response_format": "echo.utf-8.stream", "input": "echo.utf-8.stream",
         "enoutput": True}  # fmt: skip


def test_setup_registers_runs_the_hook_on_the_task_worker_and_answers(rig):
    control, recorder, fake_sys, ask = rig
    answer = ask("setup", data=SETUP)
    assert answer == {"created": CREATED, "data": "None", "error": {"code": 0, "message": ""},
                      "object": "None", "request_id": "r", "work_id": "echo.0"}  # fmt: skip
    assert recorder.ran == [("setup_task", "task:echo.0")]
    assert fake_sys.calls == [("register_unit", "echo")]
    assert [t.work_id for t in control.tasks()] == ["echo.0"]


def test_taskinfo_on_the_unit_and_on_a_task(rig):
    control, recorder, _, ask = rig
    ask("setup", data=SETUP)
    listing = ask("taskinfo")
    assert (listing["object"], listing["data"]) == ("echo.tasklist", ["echo.0"])
    info = ask("taskinfo", work_id="echo.0")
    assert (info["object"], info["data"]) == ("echo.taskinfo", {"model": "m"})
    assert ask("taskinfo", work_id="echo.7")["error"]["code"] == ErrorCode.UNIT_NOT_EXIST


def test_bad_setup_data_is_refused_and_nothing_is_registered(rig):
    _, recorder, fake_sys, ask = rig
    assert ask("setup", data="{not json")["error"]["code"] == ErrorCode.JSON_FORMAT
    assert ask("setup", data={"model": 1})["error"]["code"] == ErrorCode.MODEL_LOADING
    assert fake_sys.calls == [] and recorder.ran == []


def test_a_setup_hook_that_crashes_answers_5_saying_why_and_releases(rig):
    control, recorder, fake_sys, ask = rig
    recorder.fail["setup_task"] = RuntimeError("no such weights")
    answer = ask("setup", data=SETUP)
    assert answer["error"] == {"code": -5,
                               "message": "model loading failed: RuntimeError: no such weights"}
    assert control.submit(lambda: None).result(5) is None  # the drop queued before it ran
    assert ("release_unit", "echo.0") in fake_sys.calls
    assert control.tasks() == []


def test_a_pause_hook_that_crashes_is_answered_9_and_the_thread_goes_on(rig):
    _, recorder, _, ask = rig
    ask("setup", data=SETUP)
    recorder.fail["pause_task"] = KeyError("state")
    answer = ask("pause", work_id="echo.0")
    assert answer["error"]["code"] == ErrorCode.UNIT_CALL
    assert answer["error"]["message"] == \
        "unit call false: pause failed in unit echo: KeyError: 'state'"
    assert answer["work_id"] == "echo.0"
    recorder.fail.clear()
    assert ask("pause", work_id="echo.0")["error"]["code"] == 0
    assert ("pause_task", "unit:echo") in recorder.ran  # pause runs on the control thread


def test_a_hook_refusing_with_a_unit_error_answers_its_code(rig):
    _, recorder, _, ask = rig
    ask("setup", data=SETUP)
    recorder.fail["work_task"] = UnitError(ErrorCode.ALREADY_WORKING)
    assert ask("work", work_id="echo.0")["error"] == {"code": -13, "message": "already working"}


def test_the_units_own_actions_on_the_unit_and_on_a_task(rig):
    _, recorder, _, ask = rig
    ask("setup", data=SETUP)
    answer = ask("stats", data={"x": 1})
    assert answer["object"] == "echo.stats"
    assert answer["data"] == {"work_id": "echo", "data": {"x": 1}}
    assert ask("stats", work_id="echo.0")["data"]["work_id"] == "echo.0"
    assert ask("stats", work_id="echo.9")["error"]["code"] == ErrorCode.UNIT_NOT_EXIST
    recorder.fail["unit_action"] = ValueError("boom")
    assert ask("stats")["error"] == {"code": -11, "message": "model run failed: stats failed: boom"}


def test_exit_runs_the_hook_on_the_worker_releases_then_answers(rig):
    control, recorder, fake_sys, ask = rig
    ask("setup", data=SETUP)
    answer = ask("exit", work_id="echo.0")
    assert (answer["error"]["code"], answer["work_id"]) == (0, "echo.0")
    assert ("exit_task", "task:echo.0") in recorder.ran
    assert fake_sys.calls[-1] == ("release_unit", "echo.0")  # released before the answer
    assert control.tasks() == []
    assert ask("exit", work_id="echo.0")["error"]["code"] == ErrorCode.UNIT_NOT_EXIST


def test_unreadable_requests_are_answered_with_request_id_0(rig, runtime_dir, sockets):
    control, _, _, _ = rig
    client = sockets(zmq.PULL)
    url = f"ipc://{runtime_dir}/raw.sock"
    client.bind(url)
    control.put("setup", url, b"[1, 2")
    assert client.poll(10_000)
    answer = json.loads(client.recv())
    assert (answer["request_id"], answer["error"]["code"]) == ("0", ErrorCode.JSON_FORMAT)


def test_put_after_stop_is_refused(runtime_dir):
    config = UnitConfig(name="echo", runtime_dir=runtime_dir)
    control = Control(config, Recorder().hooks(), SysClient(runtime_dir=runtime_dir))
    control.start()
    assert control.stop(5)
    assert control.put("taskinfo", "ipc:///nowhere", b"{}") is False
    assert control.take_tasks() == ([], [])


def test_a_units_own_actions_cannot_shadow_the_standard_ones(runtime_dir):
    from edgellm.unit import Unit

    class Shadowing(Unit):
        EXTRA_ACTIONS = ("stats", "setup")

    with pytest.raises(TypeError, match="setup"):
        Shadowing(UnitConfig(name="echo", runtime_dir=runtime_dir))
