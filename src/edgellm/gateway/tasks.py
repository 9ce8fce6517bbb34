"""The tasks the gateway holds on one llm unit for one model, each leased to one request at
a time, and what the unit's error codes mean for a request.

A task is set up once (``setup`` -> ``llm.<n>``) and reused: :meth:`TaskPool.acquire` takes
an idle one or sets a new one up; :meth:`TaskPool.release` returns it after a clean end;
:meth:`TaskPool.stop_generation` ends the generation in flight (``pause``: the unit ends it
with ``finish_reason`` ``abort``; then ``work``, so the task takes requests again);
:meth:`TaskPool.discard` gives a task in an unknown state back (``exit``). When the unit
manager may have restarted, :meth:`TaskPool.forget` drops the idle tasks without a word (their
work ids are gone with it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from edgellm.gateway.backend import BackendError, BackendUnavailable, RequestRefused
from edgellm.gateway.frontdoor import LOST, FrontDoor, FrontDoorError
from edgellm.protocol.errors import ErrorCode

log = logging.getLogger(__name__)

STREAM = "llm.utf-8.stream"
INPUT = "llm.utf-8"
STOP_TIMEOUT = 5.0


class StaleTask(BackendUnavailable):
    """The task is gone or paused (the unit or its manager restarted): the backend itself
    may be fine, so one retry on it with a fresh task is worth it."""

    same_backend = True


def unit_error(key: str, answer: dict[str, Any]) -> BackendError:
    """The :class:`BackendError` for an error answer of a unit or its manager."""
    error = answer.get("error") or {}
    code, message = error.get("code"), str(error.get("message") or "")[:500]
    text = f"{key}: {message or 'error'} ({code})"
    if code in (ErrorCode.UNSUPPORTED_LINK, ErrorCode.EMPTY_INFERENCE, ErrorCode.STREAM_INDEX):
        lowered = message.lower()
        too_long = "context" in lowered or "fit" in lowered
        what = "context_length_exceeded" if too_long else "invalid_value"
        return RequestRefused(message or "the engine refused the request", code=what)
    if code in (ErrorCode.INFERENCE_PUSH, ErrorCode.NOT_WORKING, ErrorCode.UNIT_NOT_EXIST):
        return StaleTask(text)
    if code in (ErrorCode.UNIT_CALL, ErrorCode.MODEL_LOADING, ErrorCode.MODEL_INIT,
                ErrorCode.MODEL_RUN, ErrorCode.UNIT_RESOURCE, ErrorCode.TASK_FULL):  # fmt: skip
        return BackendUnavailable(text)
    return BackendError(text, status=500, code="engine_error")


class TaskPool:
    """Leased tasks of one (unit, model) on one front door."""

    def __init__(self, door: FrontDoor, unit: str, model: str, *, max_context: int | None = None,
                 max_tasks: int = 64, setup_timeout: float = 120.0,
                 call_timeout: float = 10.0):  # fmt: skip
        self.door = door
        self.max_context = max_context
        self.unit = unit
        self.model = model
        self.max_tasks = max_tasks
        self.setup_timeout = setup_timeout
        self.call_timeout = call_timeout
        self.idle: list[str] = []
        """Idle tasks, the most recently used last (taken first: the others may age out)."""
        self._idle_since: dict[str, float] = {}
        self.leased: set[str] = set()
        self._setting_up = 0

    async def warm(self) -> None:
        """Set up one task ahead of the first request (failures are only logged)."""
        try:
            self._park(await self._setup())
        except BackendError as exc:
            log.info("could not warm a task of %s/%s: %s", self.unit, self.model, exc)

    async def acquire(self) -> str:
        """An idle task, else a new one; raises :class:`BackendError`."""
        if self.idle:
            work_id = self.idle.pop()
            self._idle_since.pop(work_id, None)
        else:
            if len(self.leased) + self._setting_up >= self.max_tasks:
                raise BackendUnavailable(f"{self.unit}: {self.max_tasks} tasks in use",
                                         status=429, code="too_many_tasks")  # fmt: skip
            work_id = await self._setup()
        self.leased.add(work_id)
        return work_id

    async def _setup(self) -> str:
        data: dict[str, Any] = {"model": self.model, "response_format": STREAM, "input": INPUT,
                                "enoutput": True, "temperature": 1.0, "top_p": 1.0}  # fmt: skip
        # OpenAI's defaults when a request names no sampling (the unit's own is greedy), and
        # room for any max_tokens the context allows (requests always say theirs).
        if self.max_context is not None and self.max_context > 1:
            data["max_token_len"] = self.max_context - 1
        self._setting_up += 1
        try:
            answer = await self.door.call("setup", self.unit, data, object_="llm.setup",
                                          timeout=self.setup_timeout)  # fmt: skip
        except FrontDoorError as exc:
            raise BackendUnavailable(f"{self.unit}: setup failed: {exc}") from None
        finally:
            self._setting_up -= 1
        work_id = answer.get("work_id")
        if (answer.get("error") or {}).get("code", 0) != 0 or not isinstance(work_id, str):
            error = unit_error(f"{self.door.host}:{self.door.port}/{self.unit}", answer)
            if isinstance(error, RequestRefused):  # a refused setup is the backend's problem
                error = BackendUnavailable(error.message)
            raise error
        log.debug("task %s set up for %s", work_id, self.model)
        return work_id

    def release(self, work_id: str) -> None:
        if work_id in self.leased:
            self.leased.discard(work_id)
            self._park(work_id)

    def _park(self, work_id: str) -> None:
        self.idle.append(work_id)
        self._idle_since[work_id] = time.monotonic()

    def trim(self, keep: int, idle_for: float) -> list[str]:
        """Take out the idle tasks unused for ``idle_for`` seconds beyond the ``keep`` most
        recent ones (a burst's tasks are not held forever); returns them, for ``discard``."""
        horizon = time.monotonic() - idle_for
        old = [w for w in self.idle[:max(0, len(self.idle) - keep)]
               if self._idle_since.get(w, 0.0) < horizon]  # fmt: skip
        for work_id in old:
            self.idle.remove(work_id)
            self._idle_since.pop(work_id, None)
        return old

    async def discard(self, work_id: str) -> None:
        """End a task in an unknown state (best effort)."""
        self.leased.discard(work_id)
        try:
            await self.door.call("exit", work_id, timeout=self.call_timeout)
        except FrontDoorError as exc:
            log.debug("exit %s: %s", work_id, exc)

    async def stop_generation(self, work_id: str, queue: asyncio.Queue) -> bool:
        """``pause`` the task, wait for its generation's last piece, ``work`` it again.
        True if the task is clean and reusable."""
        try:
            paused = await self.door.call("pause", work_id, timeout=self.call_timeout)
            if (paused.get("error") or {}).get("code", 0) != 0:
                return False
            async with asyncio.timeout(STOP_TIMEOUT):
                while True:
                    answer = await queue.get()
                    if answer is LOST:
                        return False
                    data = answer.get("data")
                    if (answer.get("error") or {}).get("code", 0) != 0 or (
                            isinstance(data, dict) and data.get("finish")):  # fmt: skip
                        break
            resumed = await self.door.call("work", work_id, timeout=self.call_timeout)
            return (resumed.get("error") or {}).get("code", 0) == 0
        except (FrontDoorError, TimeoutError) as exc:
            log.info("could not stop the generation on %s: %r", work_id, exc)
            return False

    def forget(self) -> list[str]:
        """Drop every task (their requests end on their own); returns the idle ones."""
        idle, self.idle = self.idle, []
        self._idle_since.clear()
        self.leased.clear()
        return idle

    async def close(self) -> None:
        """Exit every idle task (leased ones end with their requests)."""
        idle, self.idle = self.idle, []
        self._idle_since.clear()
        await asyncio.gather(*(self.discard(w) for w in idle), return_exceptions=True)
