"""Deadline tracking of forwarded requests and the terminal-answer rule."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from edgellm.manager.pending import PendingTable
from edgellm.manager.session import _AnswerView, is_terminal
from edgellm.manager.units import HeldRequest


def view(**fields):
    return msgspec.json.decode(msgspec.json.encode(fields), type=_AnswerView)


@pytest.mark.parametrize(
    "fields, terminal",
    [
        ({"data": {"delta": "a", "finish": False, "index": 0}}, False),
        ({"data": {"delta": "", "finish": True, "index": 2}}, True),
        ({"data": "None", "error": {"code": 0, "message": ""}}, True),  # setup / exit
        ({"data": ["llm.0"]}, True),  # taskinfo list
        ({"data": {"model": "m"}}, True),  # a dict without "finish"
        ({"data": {"finish": False}, "error": {"code": -11, "message": "x"}}, True),
    ],
)
def test_terminal_answer_rule(fields, terminal):
    assert is_terminal(view(**fields)) is terminal


def run(coro):
    return asyncio.run(coro)


async def expiry_log(table_timeout=0.05):
    expired: list[tuple[str, str]] = []
    done = asyncio.Event()

    def on_expired(p, reason):
        expired.append((p.request_id, reason))
        done.set()

    return PendingTable(asyncio.get_running_loop(), table_timeout, on_expired), expired, done


def test_answers_close_requests_and_unknown_answers_pass():
    async def main():
        table, expired, _ = await expiry_log(5.0)
        table.add("r1", "llm.0", inference=True)
        assert table.answered("r1", terminal=False) and len(table) == 1
        assert table.answered("r1", terminal=True) and len(table) == 0
        assert table.answered("other", terminal=True)  # not ours: forwarded
        assert table.answered(123, terminal=True)
        table.close()
        assert expired == []

    run(main())


def test_silence_expires_once_and_late_pieces_are_dropped():
    async def main():
        table, expired, done = await expiry_log()
        table.add("r1", "llm.0", inference=True)
        await asyncio.wait_for(done.wait(), 5)
        assert expired == [("r1", "timeout")] and len(table) == 0
        assert table.answered("r1", terminal=False) is False
        assert table.answered("r1", terminal=True) is False
        table.add("r1", "llm.0")  # the id is reused by a new request: answers count again
        assert table.answered("r1", terminal=True) is True
        table.close()

    run(main())


def test_each_piece_extends_the_deadline():
    async def main():
        table, expired, done = await expiry_log(1.0)
        table.add("r", "llm.0", inference=True)
        for _ in range(15):  # 1.5 s of pieces, each well inside the 1 s idle deadline
            await asyncio.sleep(0.1)
            assert table.answered("r", terminal=False)
        assert expired == []
        await asyncio.wait_for(done.wait(), 5)
        assert expired == [("r", "timeout")]

    run(main())


def test_concurrent_requests_sharing_an_id_each_get_one_answer():
    async def main():
        table, expired, done = await expiry_log(5.0)
        table.add("same", "llm.0")
        table.add("same", "llm.0")
        assert table.answered("same", terminal=True) and len(table) == 1
        assert table.answered("same", terminal=True) and len(table) == 0
        p = table.add("x", "llm.0")
        assert table.cancel(p) is True and table.cancel(p) is False
        assert table.answered("x", terminal=True) is False  # a late unit answer is dropped
        table.close()

    run(main())


def test_detach_fails_open_requests_of_that_work_id_after_the_grace():
    async def main():
        table, expired, done = await expiry_log(60.0)
        table.add("a", "llm.0", inference=True)
        table.add("b", "llm.1", inference=True)
        table.add("c", "llm.0")  # e.g. a taskinfo sent to the task
        table.add("d", "llm")  # sent to the unit, not the task: untouched
        table.detach("llm.0", 0.05)
        while len(expired) < 2:
            await asyncio.wait_for(done.wait(), 5)
            done.clear()
        assert sorted(expired) == [("a", "detached"), ("c", "detached")]
        assert {p.request_id for p in table} == {"b", "d"}
        table.close()

    run(main())


def test_held_request_fails_unless_attached():
    async def main():
        table, expired, done = await expiry_log(60.0)
        p1 = table.add("h1", "llm.0", inference=True)
        held1 = HeldRequest(b"x" * 1000, p1)
        table.hold(p1, held1, 0.05)
        p2 = table.add("h2", "llm.0", inference=True)
        table.hold(p2, HeldRequest(b"y", p2), 0.05)
        p2.attached()  # the subscriber arrived for h2
        await asyncio.wait_for(done.wait(), 5)
        assert expired == [("h1", "held")] and held1.cancelled and held1.payload == b""
        assert [p.request_id for p in table] == ["h2"]
        table.close()

    run(main())


def test_a_request_may_carry_its_own_deadline():
    async def main():
        table, expired, done = await expiry_log(60.0)
        p = table.add("setup", "llm", timeout=0.05)  # e.g. a setup with its own timeout
        table.add("other", "llm.0")
        await asyncio.wait_for(done.wait(), 5)
        assert expired == [("setup", "timeout")] and p.timeout == 0.05
        assert [q.request_id for q in table] == ["other"]
        table.close()

    run(main())
