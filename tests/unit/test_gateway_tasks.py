"""The task pool's bookkeeping: leases, idle order, trimming a burst's tasks, and what the
unit's error codes mean for a request."""

from __future__ import annotations

import time

from edgellm.gateway.backend import BackendError, BackendUnavailable, RequestRefused
from edgellm.gateway.tasks import StaleTask, TaskPool, unit_error


def _error(code: int, message: str = "") -> dict:
    return {"error": {"code": code, "message": message}}


def test_unit_errors():
    too_long = unit_error("b", _error(-22, "config error: the prompt has 900 tokens; the context holds 512"))
    assert isinstance(too_long, RequestRefused) and too_long.code == "context_length_exceeded"
    assert isinstance(unit_error("b", _error(-22, "top_p must be in (0, 1]")), RequestRefused)
    assert isinstance(unit_error("b", _error(-4)), StaleTask) and StaleTask.same_backend
    assert isinstance(unit_error("b", _error(-14)), StaleTask)
    for code in (-9, -5, -11, -21):
        error = unit_error("b", _error(code))
        assert isinstance(error, BackendUnavailable) and not isinstance(error, StaleTask)
    odd = unit_error("b", _error(-2))
    assert type(odd) is BackendError and odd.status == 500


def test_idle_tasks_beyond_the_warm_ones_age_out():
    pool = TaskPool(door=None, unit="llm", model="m")
    for work_id in ("llm.1", "llm.2", "llm.3"):
        pool.leased.add(work_id)
        pool.release(work_id)
    assert pool.trim(keep=1, idle_for=60) == []  # all fresh
    pool._idle_since["llm.1"] = pool._idle_since["llm.2"] = time.monotonic() - 120
    assert pool.trim(keep=1, idle_for=60) == ["llm.1", "llm.2"]
    assert pool.idle == ["llm.3"]
    pool._idle_since["llm.3"] -= 120
    assert pool.trim(keep=1, idle_for=60) == []  # the warm one stays, however old
    assert pool.forget() == ["llm.3"] and pool.idle == [] and pool._idle_since == {}
