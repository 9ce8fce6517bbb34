"""Unit tasks the manager has handed out (``register_unit``) and their inference channels.

Each task ``<unit>.<n>`` owns two ports of the pool: its output url (the unit binds a PUB
there; chained units subscribe) and its inference url, where the manager binds the socket
it publishes clients' inference requests on.

That socket is an XPUB rather than upstream's PUB: on the wire the same thing to a SUB
(C++ units included), but it tells the manager when the task's subscriber arrives and when
the last one goes away. So the manager

- holds an inference request that arrives before the task has subscribed (PUB/SUB's "slow
  joiner" would silently drop it) and sends it once the subscription lands,
- learns at once that a unit died or closed the task (the subscription disappears), so the
  waiting client is answered instead of left waiting, and
- releases a task that stays without a subscriber (``orphan_timeout`` after its last one
  left, ``setup_timeout`` if none ever came): a unit that died without releasing its tasks
  does not keep their ports and work ids forever.

Everything here runs on the manager's event loop thread: the XPUB endpoints are watched
by the loop itself (:class:`edgellm.comm.aio.Watch`) and never block.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from edgellm.comm.aio import Watch
from edgellm.comm.endpoints import XPub
from edgellm.comm.errors import EndpointError
from edgellm.manager.allocator import PoolExhausted, PortPool, WorkIdCounter
from edgellm.manager.config import ManagerConfig
from edgellm.manager.store import KeyValueStore

log = logging.getLogger(__name__)

UNIT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Unit names the C++ side can parse back out of a work id (its regex is ``(\\w+)\\.(\\d+)``)."""

MAX_HELD = 1024
"""Inference requests held per task while it has no subscriber (beyond: refused at once)."""

_SUBSCRIBE = 1
_UNSUBSCRIBE = 0


class RegistrationError(Exception):
    """``register_unit`` cannot be served (bad name, no ports left, bind failed)."""


@dataclass(eq=False)
class HeldRequest:
    """An inference request waiting for its task's subscriber; ``owner`` gets told on flush."""

    payload: bytes
    owner: Any  # the Pending entry that tracks the client's answer
    cancelled: bool = False

    def cancel(self) -> None:
        """Never send it (its client was answered or left); its payload is freed now."""
        self.cancelled = True
        self.payload = b""


@dataclass(eq=False)
class UnitTask:
    """One registered task: ``work_id`` = ``<unit>.<number>``."""

    unit: str
    number: int
    output_url: str
    inference_url: str
    ports: tuple[int, int]
    endpoint: XPub
    watch: Watch | None = None
    subscribed: bool = False
    enoutput: bool = True
    """False once the task's setup (``enoutput`` false) succeeded: its outputs are only
    published to chained tasks, so the client expects no answer to its inference."""
    held: deque[HeldRequest] = field(default_factory=deque)
    orphan_timer: asyncio.TimerHandle | None = None

    @property
    def work_id(self) -> str:
        return f"{self.unit}.{self.number}"

    def describe(self) -> dict[str, Any]:
        return {
            "work_id": self.work_id,
            "unit": self.unit,
            "output_url": self.output_url,
            "inference_url": self.inference_url,
            "subscribed": self.subscribed,
            "enoutput": self.enoutput,
        }


class UnitRegistry:
    """Allocates, tracks and releases unit tasks and their inference XPUB sockets.

    ``on_attach(task)`` is called when a task's subscriber arrives (held requests have just
    been sent); ``on_detach(task)`` when the last subscriber leaves or the task is released.
    """

    def __init__(
        self,
        config: ManagerConfig,
        loop: asyncio.AbstractEventLoop,
        store: KeyValueStore,
        *,
        on_detach: Callable[[UnitTask], None] = lambda task: None,
    ):
        self.config = config
        self._loop = loop
        self._store = store
        self._on_detach = on_detach
        self.ports = PortPool(config.min_port, config.max_port)
        """The port pool; shared with the units' own leases (:mod:`edgellm.manager.leases`)."""
        self._numbers = WorkIdCounter(config.work_id)
        self._tasks: dict[str, UnitTask] = {}
        self._closed = False

    # -- sys RPC operations -------------------------------------------------------------------

    def register(self, unit: str) -> UnitTask:
        """A new task of ``unit``: work id, two ports, the inference XPUB bound.

        Raises :class:`RegistrationError`; nothing is left allocated then.
        """
        if self._closed:
            raise RegistrationError("unit manager is stopping")
        if not UNIT_NAME.match(unit):
            raise RegistrationError(f"invalid unit name {unit!r}")
        try:
            out_port = self.ports.take()
        except PoolExhausted as exc:
            raise RegistrationError(str(exc)) from None
        try:
            inf_port = self.ports.take()
        except PoolExhausted as exc:
            self.ports.give_back(out_port)
            raise RegistrationError(str(exc)) from None
        output_url = self._unit_url(out_port, unit, "output_url")
        inference_url = self._unit_url(inf_port, unit, "inference_url")
        try:
            endpoint = XPub(inference_url, dir_mode=self.config.ipc_mode)
        except OSError as exc:  # EndpointError, or the ipc directory could not be made
            self.ports.give_back(out_port)
            self.ports.give_back(inf_port)
            raise RegistrationError(f"cannot bind {inference_url}: {exc}") from None
        task = UnitTask(unit, self._numbers.next(), output_url, inference_url,
                        (out_port, inf_port), endpoint)  # fmt: skip
        self._tasks[task.work_id] = task
        self._store.set(task.work_id + ".out_port", output_url)
        task.watch = Watch(self._loop, endpoint, lambda: self._on_readable(task))
        task.watch.resume()
        self._watch_orphan(task, self.config.setup_timeout)
        log.info("registered %s (output %s, inference %s)", task.work_id, output_url, inference_url)
        return task

    def release(self, work_id: str) -> bool:
        """Close a task's socket, free its ports and keys; False if it was unknown."""
        task = self._tasks.pop(work_id, None)
        if task is None:
            return False
        self._close_task(task)
        self._store.unset(work_id + ".out_port")
        log.info("released %s", work_id)
        self._on_detach(task)
        return True

    def _watch_orphan(self, task: UnitTask, seconds: float) -> None:
        task.orphan_timer = self._loop.call_later(seconds, self._release_orphan, task)

    def _release_orphan(self, task: UnitTask) -> None:
        task.orphan_timer = None
        if self._tasks.get(task.work_id) is task and not task.subscribed:
            log.warning("%s has had no subscriber for too long: released", task.work_id)
            self.release(task.work_id)

    def _unit_url(self, port: int, unit: str, role: str) -> str:
        url = self.config.zmq_s_format % port
        if self.config.uses_ipc_suffix:
            url += f".{unit}.{role}"
        return url

    # -- inference ----------------------------------------------------------------------------

    def get(self, work_id: str) -> UnitTask | None:
        return self._tasks.get(work_id)

    def publish(self, task: UnitTask, payload: bytes) -> None:
        """Send one inference message to a subscribed task (never blocks: XPUB drops at HWM)."""
        self._send(task, payload)
        task.watch.poke()  # the send may have consumed the edge of a subscription message

    @staticmethod
    def _send(task: UnitTask, payload: bytes) -> None:
        try:
            task.endpoint.send(payload)
        except EndpointError as exc:
            log.warning("publish to %s failed: %s", task.work_id, exc)

    def hold(self, task: UnitTask, held: HeldRequest) -> bool:
        """Keep a request until ``task`` subscribes; False if ``MAX_HELD`` live ones are
        already held. Cancelled ones (expired, client gone) do not count and are dropped."""
        queue = task.held
        while queue and queue[0].cancelled:
            queue.popleft()
        if len(queue) >= MAX_HELD:
            task.held = queue = deque(h for h in queue if not h.cancelled)
            if len(queue) >= MAX_HELD:
                return False
        queue.append(held)
        return True

    def _on_readable(self, task: UnitTask) -> None:
        # Until a drain after the last send (a flush) finds nothing: no edge is missed.
        while not task.endpoint.closed:
            messages = task.endpoint.drain(64)
            if not messages:
                return
            for msg in messages:
                self._subscription(task, msg)

    def _subscription(self, task: UnitTask, msg: bytes) -> None:
        """One subscription message of a task's XPUB: a subscriber came or left."""
        if not msg:
            return
        if msg[0] == _SUBSCRIBE and not task.subscribed:
            task.subscribed = True
            if task.orphan_timer is not None:
                task.orphan_timer.cancel()
                task.orphan_timer = None
            log.debug("%s: subscriber attached", task.work_id)
            self._flush(task)
        elif msg[0] == _UNSUBSCRIBE and task.subscribed:
            task.subscribed = False
            log.info("%s: subscriber went away", task.work_id)
            self._watch_orphan(task, self.config.orphan_timeout)
            self._on_detach(task)

    def _flush(self, task: UnitTask) -> None:
        while task.held and task.subscribed:
            held = task.held.popleft()
            if held.cancelled:
                continue
            self._send(task, held.payload)
            held.owner.attached()

    # -- listing / lifecycle ------------------------------------------------------------------

    def __iter__(self) -> Iterator[UnitTask]:
        return iter(list(self._tasks.values()))

    def __len__(self) -> int:
        return len(self._tasks)

    def _close_task(self, task: UnitTask) -> None:
        if task.orphan_timer is not None:
            task.orphan_timer.cancel()
            task.orphan_timer = None
        task.watch.close()  # the endpoint and its ipc file too
        for held in task.held:
            held.cancel()
        task.held.clear()
        self.ports.give_back(task.ports[0])
        self.ports.give_back(task.ports[1])

    def close(self) -> None:
        """Close every task socket and remove its file; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for work_id in list(self._tasks):
            task = self._tasks.pop(work_id)
            self._close_task(task)
