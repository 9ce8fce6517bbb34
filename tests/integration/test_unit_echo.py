"""The echo unit and the controller library, in process, through a C++-faithful unit
manager (see test_interop_cpp_manager.py): every action, every error path, chaining,
and that one task's slow work stalls neither the RPC service nor other tasks."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
import zmq
from test_interop_cpp_manager import (  # noqa: F401 (fixtures)
    CppStyleManager,
    cpp_manager,
    inference_request,
    set_param,
    setup_request,
)
from waits import wait_until

from edgellm.unit import Task, Unit, UnitConfig
from edgellm.units.echo import EchoUnit

OK = {"code": 0, "message": ""}


@pytest.fixture
def echo(runtime_dir, cpp_manager):
    unit = EchoUnit(UnitConfig(runtime_dir=runtime_dir, max_tasks=3)).start()
    yield unit
    unit.stop()


@pytest.fixture
def session(cpp_manager):
    s = cpp_manager.session()
    yield s
    s.close()


def setup_ok(session, request_id="llm_001", **data) -> str:
    reply = session.request(setup_request(request_id=request_id, **data))
    assert reply["error"] == OK, reply
    assert (reply["object"], reply["data"], reply["request_id"]) == ("None", "None", request_id)
    return reply["work_id"]


def action(session, work_id, name, request_id="r", **extra):
    return session.request({"request_id": request_id, "work_id": work_id, "action": name, **extra})


def deltas(replies):
    return [r["data"]["delta"] for r in replies]


def test_rpc_service_lists_every_action(echo, runtime_dir):
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.connect(echo.rpc_url)
    try:
        req.send_multipart([b"list_action", b""])
        assert req.poll(5000)
        actions = json.loads(req.recv())["actions"]
        req.send_multipart([b"setup", set_param(b"ipc:///nowhere", b"{}")])
        assert req.poll(5000)
        assert req.recv() == b"None"  # answered at once; the real answer goes by PUSH
    finally:
        req.close()
    assert set(actions) >= {"setup", "pause", "work", "exit", "taskinfo", "link", "unlink"}
    assert echo.rpc_url == f"ipc://{runtime_dir}/rpc.llm"


def test_streamed_inference_and_repeat(echo, session):
    work_id = setup_ok(session)
    for text in ("one", "twó ünïcode 🙂", ""):
        request = inference_request(work_id, text, request_id=f"q-{text}")
        if text == "":
            request["data"]["delta"] = ""
        replies = session.stream(request)
        assert deltas(replies) == [text, "hello", ""]
        assert [r["data"]["index"] for r in replies] == [0, 1, 2]
        assert {r["request_id"] for r in replies} == {f"q-{text}"}


def test_non_stream_format_answers_once(echo, session):
    work_id = setup_ok(session, response_format="llm.utf-8")
    replies = session.stream(
        {"request_id": "n1", "work_id": work_id, "action": "inference",
         "object": "llm.utf-8", "data": "plain text"}
    )
    assert len(replies) == 1
    assert replies[0]["data"] == "plain texthello"
    assert replies[0]["object"] == "llm.utf-8"
    assert replies[0]["error"] == OK
    assert session.quiet()


def test_streamed_input_is_reassembled(echo, session):
    work_id = setup_ok(session)
    base = {"request_id": "s", "work_id": work_id, "action": "inference",
            "object": "llm.utf-8.stream"}
    session.send({**base, "data": {"delta": "wor", "index": 1, "finish": False}})
    session.send({**base, "data": {"delta": "hello ", "index": 0, "finish": False}})
    replies = session.stream({**base, "data": {"delta": "ld", "index": 2, "finish": True}})
    assert deltas(replies) == ["hello world", "hello", ""]


def test_bad_stream_index_is_error_25_and_the_task_carries_on(echo, session):
    work_id = setup_ok(session)
    base = {"request_id": "bad", "work_id": work_id, "action": "inference",
            "object": "llm.utf-8.stream"}
    for data in ({"delta": "x", "index": "zero", "finish": True},
                 {"delta": "x", "index": 3, "finish": True}):
        replies = session.stream({**base, "data": data})
        assert len(replies) == 1
        assert replies[0]["error"]["code"] == -25
        assert (replies[0]["request_id"], replies[0]["work_id"]) == ("bad", work_id)
    assert deltas(session.stream(inference_request(work_id, "after"))) == ["after", "hello", ""]


@pytest.mark.parametrize("data", [None, "", "None"])
def test_empty_inference_is_error_24(echo, session, data):
    work_id = setup_ok(session)
    reply = session.request({"request_id": "e", "work_id": work_id, "action": "inference",
                             "object": "llm.utf-8", "data": data})
    assert reply["error"]["code"] == -24


def test_taskinfo_lists_tasks_and_describes_one(echo, session):
    first = setup_ok(session)
    second = setup_ok(session, input=["llm.utf-8.stream", first], enoutput=False)
    reply = action(session, "llm", "taskinfo", request_id="ti")
    assert reply["object"] == "llm.tasklist"
    assert reply["data"] == [first, second]
    assert (reply["request_id"], reply["work_id"], reply["error"]) == ("ti", "llm", OK)
    reply = action(session, second, "taskinfo")
    assert reply["object"] == "llm.taskinfo"
    assert reply["data"] == {
        "model": "DeepSeek-R1-Distill-Qwen-1.5B",
        "response_format": "llm.utf-8.stream",
        "enoutput": False,
        "inputs": ["llm.utf-8.stream", first],
    }
    assert reply["work_id"] == second


@pytest.mark.parametrize("name", ["exit", "taskinfo", "pause", "work", "link", "unlink"])
def test_unknown_work_id_is_error_6(echo, session, name):
    reply = action(session, "llm.42", name, request_id="u")
    assert reply["error"]["code"] == -6
    assert (reply["request_id"], reply["work_id"]) == ("u", "llm.42")


def test_exit_releases_and_the_work_id_is_gone(echo, session, cpp_manager):
    work_id = setup_ok(session)
    reply = action(session, work_id, "exit", request_id="llm_exit")
    assert (reply["error"], reply["work_id"], reply["request_id"]) == (OK, work_id, "llm_exit")
    assert ("release_unit", work_id.encode()) in cpp_manager.calls
    assert action(session, work_id, "exit")["error"]["code"] == -6
    assert action(session, "llm", "taskinfo")["data"] == []


def test_task_limit_is_error_21(echo, session, cpp_manager):
    work_ids = [setup_ok(session) for _ in range(3)]
    reply = session.request(setup_request(request_id="full"))
    assert reply["error"]["code"] == -21
    assert (reply["request_id"], reply["work_id"]) == ("full", "llm")
    action(session, work_ids[0], "exit")
    setup_ok(session)
    # The refused setup never took resources from the unit manager.
    assert sum(1 for c in cpp_manager.calls if c[0] == "register_unit") == 4


@pytest.mark.parametrize(
    "data, code",
    [("{not json", -2), ({"model": "m"}, -5), ({"model": "m", "response_format": "f"}, -5)],
)
def test_bad_setup_data(echo, session, data, code, cpp_manager):
    request = setup_request(request_id="bad")
    request["data"] = data
    reply = session.request(request)
    assert reply["error"]["code"] == code
    assert (reply["request_id"], reply["work_id"]) == ("bad", "llm")
    assert not any(c[0] == "register_unit" for c in cpp_manager.calls)


def test_setup_data_as_json_text_is_accepted(echo, session):
    request = setup_request()
    request["data"] = json.dumps(request["data"])
    assert session.request(request)["error"] == OK


def test_unreadable_request_gets_error_2_and_the_unit_serves_on(echo, session, cpp_manager):
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.connect(echo.rpc_url)
    try:
        for frame in (b"", b"\xff", set_param(session.url.encode(), b"{broken")):
            req.send_multipart([b"taskinfo", frame])
            assert req.poll(5000)
            assert req.recv() == b"None"
    finally:
        req.close()
    reply = session.recv()
    assert reply["error"]["code"] == -2 and reply["request_id"] == "0"
    setup_ok(session)


def test_chain_two_echo_tasks(echo, session):
    first = setup_ok(session)
    second = setup_ok(session, input=["llm.utf-8.stream", first])
    session.send(inference_request(first, "hi", request_id="chain"))
    got = {first: [], second: []}
    while not (got[first][-1:] and got[first][-1]["data"]["finish"]
               and got[second][-1:] and got[second][-1]["data"]["finish"]):
        reply = session.recv()
        got[reply["work_id"]].append(reply)
    assert deltas(got[first]) == ["hi", "hello", ""]
    # The second task echoes the first one's whole output.
    assert deltas(got[second]) == ["hihello", "hello", ""]
    assert {r["request_id"] for r in got[second]} == {"llm_001"}  # its own client's request


def test_enoutput_false_publishes_but_does_not_push(echo, session):
    silent = setup_ok(session, enoutput=False)
    downstream = setup_ok(session, input=[silent])
    session.send(inference_request(silent, "quiet"))
    replies = [session.recv() for _ in range(3)]
    assert {r["work_id"] for r in replies} == {downstream}
    assert deltas(replies) == ["quiethello", "hello", ""]
    assert session.quiet()


def test_link_and_unlink_at_run_time(echo, session):
    first = setup_ok(session)
    second = setup_ok(session)
    assert action(session, second, "link", data="llm.99")["error"]["code"] == -20
    assert action(session, second, "link", data="not a work id")["error"]["code"] == -20
    assert action(session, second, "link", data=first)["error"] == OK
    assert first in action(session, second, "taskinfo")["data"]["inputs"]
    session.send(inference_request(first, "L"))
    replies = [session.recv() for _ in range(6)]
    assert deltas([r for r in replies if r["work_id"] == second]) == ["Lhello", "hello", ""]
    assert action(session, second, "unlink", data=first)["error"] == OK
    assert first not in action(session, second, "taskinfo")["data"]["inputs"]
    assert deltas(session.stream(inference_request(first, "U"))) == ["U", "hello", ""]
    assert session.quiet()


def test_setup_with_missing_upstream_is_error_20_and_released(echo, session, cpp_manager):
    reply = session.request(setup_request(request_id="l", input=["llm.77"]))
    assert reply["error"]["code"] == -20
    assert ("release_unit", b"llm.0") in cpp_manager.calls
    assert action(session, "llm", "taskinfo")["data"] == []


def test_pause_and_work(echo, session):
    work_id = setup_ok(session)
    assert action(session, work_id, "work")["error"]["code"] == -13
    assert action(session, work_id, "pause")["error"] == OK
    assert session.stream(inference_request(work_id, "x"))[0]["error"]["code"] == -14
    assert action(session, work_id, "work")["error"] == OK
    assert deltas(session.stream(inference_request(work_id, "y"))) == ["y", "hello", ""]


def test_second_unit_with_the_same_name_refuses_to_start(echo, runtime_dir):
    other = EchoUnit(UnitConfig(runtime_dir=runtime_dir))
    with pytest.raises(RuntimeError, match="already serves"):
        other.start()
    other.stop()
    assert os.path.exists(echo.rpc_url[len("ipc://"):])


class GatedEcho(EchoUnit):
    """Blocks an inference of text "block" until released; answers others at once."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = threading.Event()
        self.blocked = threading.Event()

    def inference(self, task: Task, text: str) -> None:
        if text == "block":
            self.blocked.set()
            assert self.gate.wait(30)
        super().inference(task, text)


def test_a_slow_task_stalls_neither_rpc_nor_other_tasks(runtime_dir, cpp_manager):
    unit = GatedEcho(UnitConfig(runtime_dir=runtime_dir)).start()
    slow_session, fast_session = cpp_manager.session(), cpp_manager.session()
    try:
        slow = setup_ok(slow_session)
        fast = setup_ok(fast_session)
        slow_session.send(inference_request(slow, "block"))
        assert unit.blocked.wait(10)
        # While the slow task's worker is busy: other tasks answer, control actions run.
        assert deltas(fast_session.stream(inference_request(fast, "quick"))) == \
            ["quick", "hello", ""]
        assert action(fast_session, "llm", "taskinfo")["data"] == [slow, fast]
        third = setup_ok(fast_session)
        assert action(fast_session, third, "exit")["error"] == OK
        unit.gate.set()
        replies = [slow_session.recv() for _ in range(3)]
        assert deltas(replies) == ["block", "hello", ""]
    finally:
        unit.gate.set()
        slow_session.close()
        fast_session.close()
        unit.stop()


class ThreadedEcho(EchoUnit):
    """Answers from a thread of its own, as a unit wrapping an engine would."""

    def inference(self, task: Task, text: str) -> None:
        threading.Thread(target=super().inference, args=(task, text)).start()


def test_sends_from_other_threads_are_handed_to_the_worker(runtime_dir, cpp_manager):
    unit = ThreadedEcho(UnitConfig(runtime_dir=runtime_dir)).start()
    session = cpp_manager.session()
    try:
        work_id = setup_ok(session)
        assert deltas(session.stream(inference_request(work_id, "t"))) == ["t", "hello", ""]
    finally:
        session.close()
        unit.stop()


def test_concurrent_sessions_each_get_their_own_answers(echo, cpp_manager):
    sessions = [cpp_manager.session() for _ in range(3)]
    try:
        work_ids = [setup_ok(s) for s in sessions]
        for s, w in zip(sessions, work_ids):
            s.send(inference_request(w, w, request_id=w))
        for s, w in zip(sessions, work_ids):
            replies = [s.recv() for _ in range(3)]
            assert deltas(replies) == [w, "hello", ""]
            assert {(r["request_id"], r["work_id"]) for r in replies} == {(w, w)}
    finally:
        for s in sessions:
            s.close()


def test_unit_serves_new_setups_after_the_manager_restarts(runtime_dir):
    manager = CppStyleManager(runtime_dir).start()
    unit = EchoUnit(UnitConfig(runtime_dir=runtime_dir)).start()
    try:
        session = manager.session()
        old = setup_ok(session)
        session.close()
        manager.stop()
        manager = CppStyleManager(runtime_dir).start()  # work ids start again from 0
        session = manager.session()
        new = setup_ok(session)
        assert new == old  # re-issued: the stale task was dropped, not released
        assert ("release_unit", new.encode()) not in manager.calls
        assert deltas(session.stream(inference_request(new, "again"))) == ["again", "hello", ""]
        assert action(session, "llm", "taskinfo")["data"] == [new]
        session.close()
    finally:
        unit.stop()
        manager.stop()


def test_stop_releases_tasks_and_removes_files(runtime_dir, cpp_manager, session):
    unit = EchoUnit(UnitConfig(runtime_dir=runtime_dir)).start()
    work_id = setup_ok(session)
    output = cpp_manager.kv[f"{work_id}.out_port"][len("ipc://"):]
    assert os.path.exists(output)
    unit.stop()
    unit.stop()  # idempotent
    assert not os.path.exists(output)
    assert not os.path.exists(unit.rpc_url[len("ipc://"):])
    assert ("release_unit", work_id.encode()) in cpp_manager.calls


def test_unit_socket_files_are_owner_only(echo, session, cpp_manager):
    work_id = setup_ok(session)
    output = cpp_manager.kv[f"{work_id}.out_port"][len("ipc://"):]
    assert stat.S_IMODE(os.stat(echo.rpc_url[len("ipc://"):]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(output).st_mode) == 0o600


def test_unusable_upstream_url_fails_setup_with_an_answer(echo, session, cpp_manager):
    cpp_manager.kv["llm.50.out_port"] = "not-a-url"
    reply = session.request(setup_request(request_id="u", input=["llm.50"]))
    assert reply["error"]["code"] == -8
    assert (reply["request_id"], reply["work_id"]) == ("u", "llm")
    wait_until(lambda: ("release_unit", b"llm.0") in cpp_manager.calls)
    assert action(session, "llm", "taskinfo")["data"] == []
    first = setup_ok(session)
    assert action(session, first, "link", data="llm.50")["error"]["code"] == -20
    assert deltas(session.stream(inference_request(first, "ok"))) == ["ok", "hello", ""]


def test_a_unit_from_plain_functions(runtime_dir, cpp_manager, session):
    seen = []

    def setup_task(task, object_, data):
        seen.append((object_, data["prompt"]))

    def inference(task, text):
        task.send(task.config.response_format, text.upper())

    unit = Unit(UnitConfig(name="upper", runtime_dir=runtime_dir),
                setup_task=setup_task, inference=inference).start()
    try:
        reply = session.request(setup_request(unit="upper", response_format="upper.utf-8"))
        assert reply["error"] == OK and reply["work_id"] == "upper.0"
        assert seen == [("upper.setup", "You are a knowledgeable assistant.")]
        reply = session.request({"request_id": "f", "work_id": "upper.0", "action": "inference",
                                 "object": "upper.utf-8", "data": "shout"})
        assert (reply["data"], reply["request_id"]) == ("SHOUT", "f")
        # Hooks not given keep the library's defaults: pause is not supported (-18).
        assert action(session, "upper.0", "pause")["error"]["code"] == -18
    finally:
        unit.stop()
    with pytest.raises(TypeError, match="not a unit hook"):
        Unit(UnitConfig(), infer=inference)


def test_exit_of_a_stuck_task_still_gets_an_answer(runtime_dir, cpp_manager, session):
    unit = GatedEcho(UnitConfig(runtime_dir=runtime_dir, stop_timeout=0.3)).start()
    try:
        work_id = setup_ok(session)
        session.send(inference_request(work_id, "block"))
        assert unit.blocked.wait(10)
        reply = action(session, work_id, "exit", request_id="stuck")
        assert (reply["error"], reply["request_id"], reply["work_id"]) == (OK, "stuck", work_id)
        assert action(session, "llm", "taskinfo")["data"] == []
        assert ("release_unit", work_id.encode()) in cpp_manager.calls
        unit.gate.set()
        # The handler finishes after its task was exited: its outputs go nowhere.
        assert session.quiet(0.5)
    finally:
        unit.gate.set()
        unit.stop()


def test_exiting_a_busy_task_does_not_hold_up_other_actions(runtime_dir, cpp_manager):
    unit = GatedEcho(UnitConfig(runtime_dir=runtime_dir, stop_timeout=30)).start()
    busy_session, other_session = cpp_manager.session(), cpp_manager.session()
    try:
        busy = setup_ok(busy_session)
        other = setup_ok(other_session)
        busy_session.send(inference_request(busy, "block"))
        assert unit.blocked.wait(10)
        busy_session.send({"request_id": "bye", "work_id": busy, "action": "exit"})
        # The exit waits for the busy worker (up to stop_timeout); the control thread
        # meanwhile serves other actions: the exited task is already gone from the list.
        assert action(other_session, "llm", "taskinfo")["data"] == [other]
        assert action(other_session, other, "exit")["error"] == OK
        assert busy_session.quiet(0.2)  # no exit answer while the worker is still busy
        unit.gate.set()
        replies = [busy_session.recv() for _ in range(4)]
        exit_reply = [r for r in replies if r["request_id"] == "bye"]
        assert [(r["error"], r["work_id"]) for r in exit_reply] == [(OK, busy)]
        assert ("release_unit", busy.encode()) in cpp_manager.calls
    finally:
        unit.gate.set()
        busy_session.close()
        other_session.close()
        unit.stop()


def test_setup_without_a_sys_service_is_error_8(runtime_dir):
    ctx = zmq.Context.instance()
    unit = EchoUnit(UnitConfig(runtime_dir=runtime_dir, sys_retry_deadline=0.3)).start()
    client_url = f"ipc://{runtime_dir}/client.sock"
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    pull.bind(client_url)
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.connect(unit.rpc_url)
    try:
        req.send_multipart([b"setup", set_param(client_url.encode(),
                                                json.dumps(setup_request()).encode())])
        assert req.poll(5000) and req.recv() == b"None"
        assert pull.poll(10000)
        reply = json.loads(pull.recv())
        assert reply["error"]["code"] == -8
        assert (reply["request_id"], reply["work_id"]) == ("llm_001", "llm")
    finally:
        req.close()
        pull.close()
        unit.stop()


def test_urls_reissued_after_a_manager_restart_replace_the_stale_task(runtime_dir):
    manager = CppStyleManager(runtime_dir).start()
    unit = EchoUnit(UnitConfig(runtime_dir=runtime_dir)).start()
    try:
        session = manager.session()
        old = setup_ok(session)
        old_output = manager.kv[f"{old}.out_port"]
        session.close()
        manager.stop()
        # Numbered differently this time, but the port pool starts over: same urls.
        manager = CppStyleManager(runtime_dir, work_id_start=5).start()
        session = manager.session()
        new = setup_ok(session)
        assert new == "llm.5" and manager.kv[f"{new}.out_port"] == old_output
        assert action(session, "llm", "taskinfo")["data"] == [new]
        # The stale task's shutdown left the new task's socket file alone.
        assert os.path.exists(old_output[len("ipc://"):])
        assert deltas(session.stream(inference_request(new, "re"))) == ["re", "hello", ""]
        session.close()
    finally:
        unit.stop()
        manager.stop()


def test_hostile_inference_messages_never_break_a_task(echo, session, cpp_manager):
    work_id = setup_ok(session)
    url = session.url

    def request(**fields):
        body = {"zmq_com": url, "request_id": "h", "work_id": work_id, "action": "inference",
                "object": "llm.utf-8.stream", **fields}
        return json.dumps(body).encode()

    answered = [  # each gets exactly one error answer
        (request(data={"delta": 1, "index": 0, "finish": True}), -25),
        (request(data={"delta": "x", "index": None, "finish": True}), -25),
        (request(data=[1, 2]), -25),
        (request(data=None), -24),
        (request(object="llm.utf-8", data=""), -24),
        (request(request_id=7, data={"index": "x"}), -25),
    ]
    silent = [  # nobody to answer, or not a request: dropped
        b"", b"\xff\xfe", b"not json", b"[1,2,3]", b"null", b"[" * 100000,
        request(work_id="llm.999", data="x"),
        json.dumps({"action": "inference", "zmq_com": 5, "work_id": work_id}).encode()[:-1],
    ]
    for payload in silent:
        cpp_manager.publish_raw(work_id, payload)
    for payload, code in answered:
        cpp_manager.publish_raw(work_id, payload)
        reply = session.recv()
        assert reply["error"]["code"] == code, (payload, reply)
        assert reply["work_id"] == work_id
    assert reply["request_id"] == "7"
    # Unicode-heavy and large text passes through unchanged.
    text = "ünï 🙂 " * 20000
    assert deltas(session.stream(inference_request(work_id, text)))[0] == text
    assert session.quiet()


def test_chain_across_two_units(runtime_dir, cpp_manager, session):
    first_unit = EchoUnit(UnitConfig(name="llm", runtime_dir=runtime_dir)).start()
    second_unit = EchoUnit(UnitConfig(name="tts", runtime_dir=runtime_dir)).start()
    try:
        first = setup_ok(session)
        reply = session.request(setup_request(unit="tts", request_id="t", input=[first]))
        assert reply["error"] == OK
        second = reply["work_id"]
        assert second == "tts.1"
        session.send(inference_request(first, "ab"))
        replies = [session.recv() for _ in range(6)]
        by_unit = {w: deltas([r for r in replies if r["work_id"] == w]) for w in (first, second)}
        assert by_unit == {first: ["ab", "hello", ""], second: ["abhello", "hello", ""]}
        assert action(session, "tts", "taskinfo")["data"] == [second]
        assert action(session, "llm", "taskinfo")["data"] == [first]
    finally:
        second_unit.stop()
        first_unit.stop()


def test_many_sessions_at_once_all_answered_in_order(runtime_dir, cpp_manager):
    unit = EchoUnit(UnitConfig(runtime_dir=runtime_dir)).start()
    errors: list[BaseException] = []

    def client(n: int) -> None:
        session = cpp_manager.session()
        try:
            work_id = setup_ok(session, request_id=f"s{n}")
            for i in range(20):
                rid = f"{n}-{i}"
                replies = session.stream(inference_request(work_id, rid, request_id=rid))
                assert deltas(replies) == [rid, "hello", ""]
                assert {(r["request_id"], r["work_id"]) for r in replies} == {(rid, work_id)}
            assert action(session, work_id, "exit")["error"] == OK
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            session.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert unit.tasks() == []
    finally:
        unit.stop()
