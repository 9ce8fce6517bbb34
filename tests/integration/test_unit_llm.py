"""The llm unit as StackFlow clients see it: a unit manager and an llm unit on the tiny
model, both real processes, spoken to over the TCP front door (docs/llm-unit.md)."""

from __future__ import annotations

import json
import tempfile
import threading

import pytest

from manager_support import Client, ManagerProcess, UnitProcess

pytest.importorskip("torch")

MODEL = "tiny-llama"
STREAM = "llm.utf-8.stream"


@pytest.fixture(scope="module")
def box(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="el-llm-", dir="/tmp") as runtime_dir:
        with ManagerProcess(runtime_dir, "--box-name", "box-a") as manager:
            with UnitProcess(runtime_dir, "llm", "llm", "--model", f"{MODEL}={tiny_model_dir}",
                             "--kv-cache-mb", "2", "--threads", "1", timeout=120) as unit:  # fmt: skip
                yield manager, unit


@pytest.fixture
def client(box):
    manager, _ = box
    with Client(manager.port, timeout=60) as c:
        yield c


def setup(client, request_id="s", **data):
    body = {"model": MODEL, "response_format": STREAM, "input": STREAM, "enoutput": True,
            "max_token_len": 64}  # fmt: skip
    body.update(data)
    return client.request({"request_id": request_id, "work_id": "llm", "action": "setup",
                           "object": "llm.setup", "data": body})  # fmt: skip


def task(client, **data) -> str:
    answer = setup(client, **data)
    assert answer["error"] == {"code": 0, "message": ""}, answer
    return answer["work_id"]


def infer(client, work_id, data, request_id="i", object_=STREAM):
    return client.stream({"request_id": request_id, "work_id": work_id, "action": "inference",
                          "object": object_, "data": data})  # fmt: skip


def text_piece(text):
    return {"delta": text, "index": 0, "finish": True}


def joined(answers):
    return "".join(a["data"]["delta"] for a in answers)


# -- the session ----------------------------------------------------------------------------


def test_lsmode_lists_the_model_with_its_kv_event_endpoint(client):
    answer = client.request({"request_id": "m", "work_id": "sys", "action": "lsmode"})
    (mode,) = [m for m in answer["data"] if m.get("unit") == "llm"]
    assert mode["mode"] == MODEL and mode["type"] == "llm" and mode["block_size"] == 16
    kv = mode["kv_events"]
    assert kv["pod_key"] == "box-a/llm" and kv["topic"] == f"kv@box-a/llm@{MODEL}"
    assert kv["pub_port"] != kv["router_port"] and 5010 <= kv["pub_port"] < 5555


def test_a_streamed_session_ends_with_usage(client):
    work_id = task(client)
    answers = infer(client, work_id, text_piece("The capital of France is"), request_id="r1")
    assert all(a["request_id"] == "r1" and a["work_id"] == work_id for a in answers)
    assert [a["data"]["index"] for a in answers] == list(range(len(answers)))
    final = answers[-1]["data"]
    assert final["finish"] is True and final["delta"] == ""
    assert final["finish_reason"] in ("stop", "length")
    assert final["prompt_tokens"] > 0 and final["completion_tokens"] >= len(answers) - 1
    assert final["cached_tokens"] % 16 == 0
    again = infer(client, work_id, text_piece("The capital of France is"), request_id="r2")
    assert joined(again) == joined(answers)  # greedy by default
    assert again[-1]["data"]["cached_tokens"] == (final["prompt_tokens"] - 1) // 16 * 16
    assert client.request({"request_id": "x", "work_id": work_id, "action": "exit"})["error"]["code"] == 0


def test_input_pieces_are_gathered_until_finish(client):
    work_id = task(client)
    whole = infer(client, work_id, text_piece("one two three"))
    client.send({"request_id": "p", "work_id": work_id, "action": "inference", "object": STREAM,
                 "data": {"delta": "one two", "index": 0, "finish": False}})  # fmt: skip
    pieces = infer(client, work_id, {"delta": " three", "index": 1, "finish": True}, request_id="p")
    assert joined(pieces) == joined(whole)


def test_a_text_task_answers_once_with_the_whole_text(client):
    stream_id = task(client)
    streamed = joined(infer(client, stream_id, text_piece("hello there")))
    work_id = task(client, response_format="llm.utf-8")
    (answer,) = infer(client, work_id, "hello there", object_="llm.utf-8")
    assert answer["data"] == streamed and answer["object"] == "llm.utf-8"


def test_structured_requests_take_messages_and_overrides(client):
    work_id = task(client, response_format="llm.utf-8")
    data = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5,
            "temperature": 0}  # fmt: skip
    (answer,) = infer(client, work_id, data, object_="llm.utf-8")
    body = answer["data"]
    assert body["finish"] is True and body["completion_tokens"] <= 5
    assert set(body) == {"text", "finish", "finish_reason", "prompt_tokens", "cached_tokens",
                         "completion_tokens"}  # fmt: skip
    tokens = client.request({"request_id": "t", "work_id": "llm", "action": "tokenize",
                             "data": {"messages": data["messages"]}})  # fmt: skip
    assert tokens["object"] == "llm.tokenize" and tokens["data"]["count"] == body["prompt_tokens"]
    (by_ids,) = infer(client, work_id, {"prompt_token_ids": tokens["data"]["tokens"],
                                        "max_tokens": 5}, object_="llm.utf-8")  # fmt: skip
    assert by_ids["data"]["text"] == body["text"]


def test_taskinfo_and_stats(client):
    work_id = task(client, prompt="Be brief.", temperature=0.5, top_p=0.9)
    info = client.request({"request_id": "ti", "work_id": work_id, "action": "taskinfo"})
    assert info["object"] == "llm.taskinfo"
    assert info["data"]["model"] == MODEL and info["data"]["temperature"] == 0.5
    assert info["data"]["prompt"] == "Be brief." and info["data"]["max_token_len"] == 64
    stats = client.request({"request_id": "st", "work_id": "llm", "action": "stats"})
    assert stats["object"] == "llm.stats"
    s = stats["data"][MODEL]
    assert {"num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
            "prefix_cache_queries", "prefix_cache_hits"} <= set(s)  # fmt: skip
    assert 0 <= s["kv_cache_usage_perc"] <= 1 and s["prefix_cache_queries"] >= s["prefix_cache_hits"]


# -- pause, exit ----------------------------------------------------------------------------


def test_pause_ends_a_generation_in_flight_then_refuses_until_work(client):
    work_id = task(client, max_token_len=1000)
    client.send({"request_id": "long", "work_id": work_id, "action": "inference", "object": STREAM,
                 "data": {"messages": [{"role": "user", "content": "go"}], "ignore_eos": True}})  # fmt: skip
    first = client.recv()
    assert first["request_id"] == "long" and first["data"]["finish"] is False
    client.send({"request_id": "pz", "work_id": work_id, "action": "pause"})
    answers = []
    while len([a for a in answers if a["request_id"] == "pz"]) < 1 or not any(
        a["request_id"] == "long" and a["data"] != "None" and a["data"]["finish"] for a in answers
    ):
        answers.append(client.recv())
    finals = [a for a in answers if a["request_id"] == "long" and a["data"]["finish"]]
    assert len(finals) == 1 and finals[0]["data"]["finish_reason"] == "abort"
    assert finals[0]["data"]["completion_tokens"] < 1000
    refused = infer(client, work_id, text_piece("hi"))
    assert refused[-1]["error"]["code"] == -14
    assert client.request({"request_id": "w", "work_id": work_id, "action": "work"})["error"]["code"] == 0
    assert infer(client, work_id, text_piece("hi"))[-1]["data"]["finish"] is True


def test_exit_during_generation_sends_the_terminal_piece_first(client):
    work_id = task(client, max_token_len=1000)
    client.send({"request_id": "long", "work_id": work_id, "action": "inference", "object": STREAM,
                 "data": {"prompt": "x", "ignore_eos": True}})  # fmt: skip
    assert client.recv()["request_id"] == "long"
    client.send({"request_id": "bye", "work_id": work_id, "action": "exit"})
    answers = []
    while not any(a["request_id"] == "bye" for a in answers):
        answers.append(client.recv())
    longs = [a for a in answers if a["request_id"] == "long"]
    assert longs[-1]["data"]["finish"] is True and longs[-1]["data"]["finish_reason"] == "abort"
    assert answers[-1]["error"]["code"] == 0
    gone = infer(client, work_id, text_piece("hi"))
    assert gone[-1]["error"]["code"] == -4  # the manager no longer knows the work id


def test_concurrent_tasks_each_get_their_answers(box):
    manager, _ = box
    results = {}

    def run(i):
        with Client(manager.port, timeout=60) as c:
            work_id = task(c)
            results[i] = [infer(c, work_id, text_piece(f"question {i} {'x ' * i}"), request_id=f"q{i}")
                          for _ in range(2)]  # fmt: skip

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    for i, (first, second) in results.items():
        assert first[-1]["data"]["finish"] and joined(first) == joined(second)
        assert all(a["request_id"] == f"q{i}" for a in first + second)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("data, code", [
    ({"model": "no-such-model"}, -5),
    ({"max_token_len": 0}, -22),
    ({"max_token_len": 10**6}, -22),
    ({"max_token_len": "64"}, -22),
    ({"temperature": -1}, -22),
    ({"top_p": 2}, -22),
    ({"prompt": 5}, -22),
])  # fmt: skip
def test_bad_setups_are_refused_with_a_clear_error(client, data, code):
    answer = setup(client, **data)
    assert answer["error"]["code"] == code and answer["error"]["message"], answer
    assert answer["work_id"] == "llm"


@pytest.mark.parametrize("data, code", [
    ({"messages": "not a list"}, -24),
    ({"messages": [{"role": "wizard", "content": "x"}]}, -2),
    ({"messages": [{"role": "user"}]}, -2),
    ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, -2),
    ({"prompt": "x", "max_tokens": 65}, -22),
    ({"prompt": "x", "max_tokens": 0}, -22),
    ({"prompt": "x", "stop": 5}, -22),
    ({"prompt": "x", "colour": "red"}, -2),
    ({"prompt_token_ids": [1, "2"]}, -2),
    ({"prompt_token_ids": [10**9]}, -22),
    ({"prompt": ""}, -24),
    ({"prompt": "word " * 2000}, -22),
])  # fmt: skip
def test_bad_inference_data_gets_an_error_and_the_task_keeps_serving(client, data, code):
    work_id = task(client)
    answers = infer(client, work_id, data)
    assert answers[-1]["error"]["code"] == code, answers[-1]
    assert answers[-1]["request_id"] == "i"
    assert infer(client, work_id, text_piece("still there?"))[-1]["data"]["finish"] is True


def test_invalid_utf8_is_refused_at_the_front_door(client):
    work_id = task(client)
    raw = json.dumps({"request_id": "u", "work_id": work_id, "action": "inference",
                      "object": STREAM, "data": {"delta": "@@", "index": 0, "finish": True}})  # fmt: skip
    client.send(raw.replace("@@", "\udcff", 1).encode("utf-8", "surrogateescape") + b"\n")
    answer = client.recv()
    assert answer["error"]["code"] == -2
    assert infer(client, work_id, text_piece("fine"))[-1]["data"]["finish"] is True


def test_a_model_that_fails_to_load_is_named_in_every_setup_answer(box, tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights at all")
    manager, _ = box
    with UnitProcess(manager.runtime_dir, "broken", "llm", "--model", f"broken={broken}",
                     "--threads", "1", timeout=120) as unit, \
            Client(manager.port, timeout=60) as c:  # fmt: skip
        answer = c.request({"request_id": "b", "work_id": "broken", "action": "setup",
                            "object": "llm.setup", "data": {"model": "broken", "enoutput": True,
                                                            "response_format": STREAM}})  # fmt: skip
        assert answer["error"]["code"] == -5
        assert "failed to load" in answer["error"]["message"]
        assert unit.proc.poll() is None
        # the other unit serves on
        assert infer(c, task(c), text_piece("hi"))[-1]["data"]["finish"] is True


def test_a_killed_unit_loses_its_mode_and_ports_after_the_orphan_timeout(tiny_model_dir):
    import signal as _signal

    from waits import wait_until

    with tempfile.TemporaryDirectory(prefix="el-kill-", dir="/tmp") as runtime_dir, \
            ManagerProcess(runtime_dir, "--orphan-timeout", "1", "--min-port", "6010",
                           "--max-port", "6050") as manager, \
            Client(manager.port) as c:  # fmt: skip
        def modes():
            answer = c.request({"request_id": "m", "work_id": "sys", "action": "lsmode"})
            return [m for m in answer["data"] if m.get("unit") == "doomed"]

        unit = UnitProcess(runtime_dir, "doomed", "llm", "--model", f"{MODEL}={tiny_model_dir}",
                           "--threads", "1", timeout=120)  # fmt: skip
        try:
            (mode,) = modes()
            ports = {mode["kv_events"]["pub_port"], mode["kv_events"]["router_port"]}
            assert ports == {6010, 6011}  # leased from this manager's pool
            unit.proc.send_signal(_signal.SIGKILL)  # no goodbye: its ipc file stays behind
            unit.proc.wait(10)
        finally:
            unit.kill()
        wait_until(lambda: not modes(), timeout=10)
        with UnitProcess(runtime_dir, "heir", "llm", "--model", f"{MODEL}={tiny_model_dir}",
                         "--threads", "1", timeout=120):  # fmt: skip
            answer = c.request({"request_id": "m", "work_id": "sys", "action": "lsmode"})
            (heir,) = [m for m in answer["data"] if m.get("unit") == "heir"]
            assert {heir["kv_events"]["pub_port"], heir["kv_events"]["router_port"]} == ports


def test_leased_ports_taken_on_the_host_fall_back_to_ports_the_os_picks(box, tiny_model_dir):
    """Two unit managers on one host hand out the same pool: the second unit finds its
    leased ports bound by the first box's unit and publishes on others instead of failing."""
    manager, _ = box
    with tempfile.TemporaryDirectory(prefix="el-two-", dir="/tmp") as runtime_dir, \
            ManagerProcess(runtime_dir) as second, Client(second.port) as c, \
            UnitProcess(runtime_dir, "llm", "llm", "--model", f"{MODEL}={tiny_model_dir}",
                        "--threads", "1", timeout=120):  # fmt: skip
        answer = c.request({"request_id": "m", "work_id": "sys", "action": "lsmode"})
        (mode,) = [m for m in answer["data"] if m.get("unit") == "llm"]
        with Client(manager.port) as first:
            first_modes = first.request({"request_id": "m", "work_id": "sys", "action": "lsmode"})
        (other,) = [m for m in first_modes["data"] if m.get("unit") == "llm"]
        assert {mode["kv_events"]["pub_port"], mode["kv_events"]["router_port"]}.isdisjoint(
            {other["kv_events"]["pub_port"], other["kv_events"]["router_port"]})
        work_id = task(c)
        assert infer(c, work_id, text_piece("hi"))[-1]["data"]["finish"] is True
