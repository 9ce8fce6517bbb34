"""Deadline tracking: every request a session forwards to a unit gets exactly one terminal
answer, from the unit or, failing that, from the manager.

A request is open from the moment it is forwarded until the client has been sent its
*terminal* answer, i.e. an envelope with its ``request_id`` whose

- ``error.code`` is not 0, or
- ``data`` is not an object with a ``finish`` key (a one-shot answer: setup, exit,
  taskinfo, a non-stream inference), or
- ``data.finish`` is true (the last streamed piece).

Each answer (piece) resets the request's deadline: a request fails when the unit stays
silent for ``timeout`` seconds, not when a long stream takes long. Then the manager answers
the client itself (``on_expired``) and any piece that still arrives for that request_id is
dropped. Requests are keyed by ``request_id``; clients that reuse one id for concurrent
requests get one terminal answer per request, matched in order.

Three shorter deadlines exist:

- ``hold``: an inference request waiting for its task's subscriber (slow joiner) fails
  after ``hold`` seconds with -4 unless the subscription arrives;
- ``detach``: when a task's subscriber disappears (unit died or closed the task), the open
  requests for that work id get ``grace`` seconds for answers already in flight, then fail;
- expiry of the session (client gone): everything is dropped silently.

Timers run on the session's event loop (``loop.time()`` is monotonic). One timer per open
request, re-armed only when it fires before an extended deadline: a stream of pieces costs
no timer operations.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, Callable

REMEMBER_EXPIRED = 256
"""How many timed-out request ids a session remembers, to drop their late pieces."""


class Pending:
    """One open request (or several concurrent ones sharing a ``request_id``)."""

    __slots__ = (
        "table",
        "request_id",
        "work_id",
        "inference",
        "outstanding",
        "deadline",
        "timer",
        "held",
        "reason",
        "timeout",
        "on_done",
    )

    def __init__(
        self, table: "PendingTable", request_id: str, work_id: str, inference: bool, timeout: float
    ):
        self.table = table
        self.request_id = request_id
        self.work_id = work_id
        self.inference = inference
        self.outstanding = 1
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.held: Any = None  # the HeldRequest while waiting for a subscriber
        self.reason = "timeout"
        self.timeout = timeout
        self.on_done: Callable[[Any], None] | None = None
        """Called with the unit's terminal answer when it ends this request."""

    def attached(self) -> None:
        """The held request was just published: from now on the normal deadline applies.
        A request that expects no answer (only streamed input pieces) is done once sent."""
        self.held = None
        self.reason = "timeout"
        if self.outstanding <= 0:
            self.table.settle(self)
            return
        self.deadline = self.table.loop.time() + self.timeout

    def arm(self) -> None:
        """(Re)start the timer for :attr:`deadline` (the table's ``on_timer`` fires)."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.table.loop.call_at(self.deadline, self.table.on_timer, self)


class PendingTable:
    """Open requests of one session.

    ``on_expired(pending, reason)`` is called once per request that missed its deadline,
    with ``reason`` one of ``"timeout"``, ``"held"`` (no subscriber), ``"detached"``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        on_expired: Callable[[Pending, str], None],
    ):
        self.loop = loop
        self.timeout = timeout
        self._on_expired = on_expired
        self._open: dict[str, Pending] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self):
        return iter(list(self._open.values()))

    def add(
        self,
        request_id: str,
        work_id: str,
        *,
        inference: bool = False,
        timeout: float | None = None,
        expects_answer: bool = True,
    ) -> Pending:
        """Open a request; its deadline starts now (``timeout`` overrides the table's).

        ``expects_answer=False`` is for a streamed input piece (``finish`` false): units
        buffer it and answer only the final piece, so it adds no answer to wait for; it is
        tracked only while held for a subscriber, to fail it if it can't be delivered.
        """
        self._expired.pop(request_id, None)
        timeout = self.timeout if timeout is None else timeout
        deadline = self.loop.time() + timeout
        p = self._open.get(request_id)
        if p is not None:
            if not expects_answer:
                return p
            p.outstanding += 1
            p.timeout = max(p.timeout, timeout)
            p.deadline = max(p.deadline, deadline)
            return p
        p = Pending(self, request_id, work_id, inference, timeout)
        p.outstanding = 1 if expects_answer else 0
        p.deadline = deadline
        self._open[request_id] = p
        p.arm()
        return p

    def hold(self, p: Pending, held: Any, seconds: float) -> None:
        """``p`` waits for a subscriber: it fails after ``seconds`` unless :meth:`Pending.attached`."""
        p.held = held
        p.reason = "held"
        deadline = self.loop.time() + min(seconds, p.timeout)
        if deadline < p.deadline or p.outstanding == 1:
            p.deadline = deadline
            p.arm()

    def answered(self, request_id: Any, terminal: bool, answer: Any = None) -> bool:
        """Account one answer; False means drop it (late piece of an expired request).
        ``answer`` is handed to the request's ``on_done`` when it ends the request."""
        p = self._open.get(request_id) if type(request_id) is str else None
        if p is None:
            if type(request_id) is str and request_id in self._expired:
                return False
            if terminal and answer is not None:
                self._settle_unit_error(answer)
            return True
        if terminal:
            p.outstanding -= 1
            if p.outstanding <= 0:
                self.settle(p)
                if p.on_done is not None:
                    p.on_done(answer)
                return True
        if p.held is None:
            p.deadline = self.loop.time() + p.timeout
        return True

    def _settle_unit_error(self, answer: Any) -> None:
        """C++ StackFlow nodes send an inference's error (-24, -25, -11...) with the
        request_id of their last RPC action and the bare unit name as work_id
        (``StackFlow::send``). Such an error answers the oldest open inference of that
        unit, which would otherwise also get a -9 at its deadline."""
        error, work_id = getattr(answer, "error", None), getattr(answer, "work_id", None)
        if type(error) is not dict or error.get("code", 0) == 0:
            return
        if type(work_id) is not str or not work_id or "." in work_id:
            return
        prefix = work_id + "."
        for p in self._open.values():  # oldest first
            if p.inference and p.held is None and p.work_id.startswith(prefix):
                p.outstanding -= 1
                if p.outstanding <= 0:
                    self.settle(p)
                return

    def cancel(self, p: Pending) -> bool:
        """The manager answers the request itself (e.g. the unit call failed); False if it
        was already answered, and must not be answered again. A unit answer that still
        turns up later (a unit that woke up after its RPC timed out) is dropped."""
        if self._open.get(p.request_id) is not p:
            return False
        p.outstanding -= 1
        if p.outstanding <= 0:
            self.settle(p)
            self._remember_expired(p.request_id)
        return True

    def detach(self, work_id: str, grace: float) -> None:
        """The subscriber of ``work_id`` went away (unit died or closed the task): its open
        requests (inference, and e.g. an ``exit`` or ``taskinfo`` sent to it) fail after
        ``grace`` seconds unless answered by then."""
        deadline = self.loop.time() + grace
        for p in list(self._open.values()):
            if p.work_id == work_id and p.held is None and deadline < p.deadline:
                p.deadline = deadline
                p.reason = "detached"
                p.arm()

    def settle(self, p: Pending) -> None:
        """``p`` is done: forget it and stop its timer."""
        del self._open[p.request_id]
        if p.timer is not None:
            p.timer.cancel()
            p.timer = None

    def on_timer(self, p: Pending) -> None:
        """``p``'s timer fired: expire it, or re-arm it if its deadline moved since."""
        if self._open.get(p.request_id) is not p:
            return
        if self.loop.time() < p.deadline - 0.001:  # extended since armed
            p.arm()
            return
        self.settle(p)
        if p.held is not None:
            p.held.cancel()
        self._remember_expired(p.request_id)
        for _ in range(max(1, p.outstanding)):
            self._on_expired(p, p.reason)

    def _remember_expired(self, request_id: str) -> None:
        self._expired[request_id] = None
        while len(self._expired) > REMEMBER_EXPIRED:
            self._expired.popitem(last=False)

    def close(self) -> None:
        """Drop everything (session closed); safe to call twice."""
        for p in self._open.values():
            if p.timer is not None:
                p.timer.cancel()
            if p.held is not None:
                p.held.cancel()
        self._open.clear()
        self._expired.clear()
