"""The control thread of a unit: the actions, in arrival order (upstream's event loop).

:class:`Control` is a :class:`~edgellm.comm.loop.SocketThread`: actions arrive in its
mailbox (:meth:`Control.put`, from the RPC thread) and run one at a time. It owns the task
table, the ``sys`` client, the link to the unit manager (:mod:`edgellm.unit.manager_link`:
the unit registers, and registers again with a manager that restarted) and an outbox for
replies. It talks to the unit manager
(register/release, ``<work_id>.out_port`` look-ups) and creates and stops tasks; what must
happen on a task's own sockets (subscribing, the unit's setup of the task, answering a
link) it hands to that task's worker, so a busy task never holds up the control thread
for long and never shares a socket. It calls the unit author's code through
:class:`Hooks`, never through the unit itself.

An action that fails unexpectedly (a bug, in a hook or here) is logged with its traceback
and answered -9 saying what failed: the client never waits for an answer that will not
come.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from edgellm.comm.errors import EndpointError
from edgellm.comm.loop import SocketThread
from edgellm.comm.outbox import Outbox
from edgellm.comm.sys_client import SysClient, SysError
from edgellm.protocol.envelope import encode, make_response
from edgellm.protocol.errors import ErrorCode
from edgellm.unit.channel import TaskChannel
from edgellm.unit.config import WORK_ID_RE, TaskConfig, UnitConfig, UnitError
from edgellm.unit.manager_link import ManagerLink
from edgellm.unit.request import parse_request, text_of
from edgellm.unit.task import NONE, Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hooks:
    """The unit author's code that :class:`Control` runs (see :class:`edgellm.unit.Unit`)."""

    setup_task: Callable[[Task, str, Any], None]
    exit_task: Callable[[Task], None]
    task_info: Callable[[Task], Any]
    pause_task: Callable[[Task, Any], None]
    work_task: Callable[[Task, Any], None]
    unit_action: Callable[[str, str, Any], tuple[str, Any]]
    handle_message: Callable[[Task, str, bytes], None]
    manager_up: Callable[[], None] = lambda: None


class Control(SocketThread):
    """Runs a unit's actions on one thread. ``put()`` is thread-safe; ``stop()`` ends the
    thread after the actions queued so far and returns whether it ended in time.

    ``extra_actions``: the unit's own actions beside the standard ones, each answered by
    ``hooks.unit_action`` (see :attr:`edgellm.unit.Unit.EXTRA_ACTIONS`).
    """

    def __init__(self, config: UnitConfig, hooks: Hooks, sys_client: SysClient, *,
                 extra_actions: tuple[str, ...] = (), registration: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        super().__init__(f"unit:{config.name}")
        self.unit_name = config.name
        self.config = config
        self._hooks = hooks
        self._sys = sys_client
        self._clock = clock
        self._tasks: dict[int, Task] = {}  # by work id number; written on this thread only
        self._ending: set[Task] = set()  # lost tasks whose worker has not finished yet
        self._outbox: Outbox | None = None
        self._actions: dict[str, Callable[[str, bytes], None]] = {
            "setup": self._setup,
            "exit": self._exit,
            "taskinfo": self._taskinfo,
            "pause": functools.partial(self._hook_action, "pause_task"),
            "work": functools.partial(self._hook_action, "work_task"),
            "link": functools.partial(self._relink, link=True),
            "unlink": functools.partial(self._relink, link=False),
        }
        for action in extra_actions:
            self._actions[action] = functools.partial(self._unit_action, action)
        self.manager_link = ManagerLink(self, sys_client, config.name,
                                        registration or {}, hooks.manager_up)  # fmt: skip

    def setup(self) -> None:
        self._outbox = Outbox()
        self.manager_link.open()

    def teardown(self) -> None:
        if self._outbox is not None:
            self._outbox.close()
        self._sys.close()

    def put(self, action: str, url: str, raw: bytes) -> bool:
        """Run ``action`` (one of this unit's) for the client at ``url``; False once stopping."""
        return self.call_soon(self._act, action, url, raw)

    def tasks(self) -> list[Task]:
        """The tasks alive now, by work id number (a snapshot, from any thread)."""
        snapshot = dict(self._tasks)  # one C-level copy: safe against this thread's writes
        return [snapshot[n] for n in sorted(snapshot)]

    def take_tasks(self) -> tuple[list[Task], list[Task]]:
        """After :meth:`stop`: the tasks left (the caller stops them and releases their work
        ids) and those lost to the unit manager and still ending (the caller waits for their
        workers; their work ids are not the unit's), forgotten here."""
        tasks, ending = self.tasks(), list(self._ending)
        self._tasks.clear()
        self._ending.clear()
        return tasks, ending

    def _act(self, action: str, url: str, raw: bytes) -> None:
        try:
            self._actions[action](url, raw)
        except Exception as exc:  # answered, not only logged: the client is waiting
            log.exception("unit %s: %s failed", self.unit_name, action)
            msg, rid = parse_request(raw)
            work_id = text_of(msg.get("work_id")) if msg is not None else ""
            problem = f"{action} failed in unit {self.unit_name}: {type(exc).__name__}: {exc}"
            self._reply(url, rid, work_id or self.unit_name,
                        error=UnitError(ErrorCode.UNIT_CALL, problem))  # fmt: skip

    # -- helpers -------------------------------------------------------------------------

    def _reply(
        self,
        url: str,
        request_id: str,
        work_id: str,
        object_: str = NONE,
        data: Any = NONE,
        error: UnitError | None = None,
    ) -> None:
        code, message = (0, "") if error is None else (int(error.code), error.message)
        envelope = make_response(request_id, work_id, object_, data, code, message,
                                 created=int(self._clock()))  # fmt: skip
        self._outbox.send(url, encode(envelope))  # type: ignore[union-attr]

    def _task_for(self, work_id: str) -> Task | None:
        match = WORK_ID_RE.match(work_id)
        if match is None or match.group(1) != self.unit_name:
            return None
        return self._tasks.get(int(match.group(2)))

    def _target(self, url: str, raw: bytes) -> tuple[dict[str, Any], str, Task] | None:
        """Parse a request naming one task; answer -2/-6 and return None if it cannot."""
        msg, rid = parse_request(raw)
        if msg is None:
            self._reply(url, rid, self.unit_name, error=UnitError(ErrorCode.JSON_FORMAT))
            return None
        work_id = text_of(msg.get("work_id"))
        task = self._task_for(work_id)
        if task is None:
            self._reply(url, rid, work_id, error=UnitError(ErrorCode.UNIT_NOT_EXIST))
            return None
        return msg, rid, task

    def _upstream_url(self, upstream: str, work_id: str) -> str:
        if upstream == work_id:
            raise UnitError(ErrorCode.LINK, f"{work_id} cannot take its own output")
        try:
            found = self._sys.sql_select(f"{upstream}.out_port")
        except SysError as exc:
            raise UnitError(ErrorCode.LINK, str(exc)) from exc
        if not found:
            raise UnitError(ErrorCode.LINK, f"no task {upstream}")
        return found

    def _release(self, work_id: str) -> None:
        try:
            self._sys.release_unit(work_id)
        except SysError as exc:
            log.warning("release of %s failed: %s", work_id, exc)

    def _drop(self, task: Task) -> None:
        if self._tasks.get(task.number) is task:
            del self._tasks[task.number]
            task.channel.stop(self.config.stop_timeout)
            self._release(task.work_id)

    # -- actions -------------------------------------------------------------------------

    def _setup(self, url: str, raw: bytes) -> None:
        msg, rid = parse_request(raw)
        if msg is None:
            self._reply(url, rid, self.unit_name, error=UnitError(ErrorCode.JSON_FORMAT))
            return
        if len(self._tasks) >= self.config.max_tasks:
            error = UnitError(ErrorCode.TASK_FULL, f"{self.config.max_tasks} tasks running")
            self._reply(url, rid, self.unit_name, error=error)
            return
        data = msg.get("data")
        try:
            if isinstance(data, str):  # setup data sent as JSON text
                try:
                    data = json.loads(data)
                except (ValueError, RecursionError):
                    raise UnitError(ErrorCode.JSON_FORMAT, "setup data is not JSON") from None
            task_config = TaskConfig.parse(data)
        except UnitError as exc:
            self._reply(url, rid, self.unit_name, error=exc)
            return
        try:
            registration = self._sys.register_unit(self.unit_name)
        except SysError as exc:
            error = UnitError(ErrorCode.UNIT_RESOURCE, str(exc))
            self._reply(url, rid, self.unit_name, error=error)
            return
        # A unit manager that restarted hands out work ids and urls again: a task still
        # holding one is gone for it, so drop it without releasing (that would free the
        # new one).
        for stale in [
            t for t in self._tasks.values()
            if t.number == registration.number
            or t.registration.output_url == registration.output_url
            or t.registration.inference_url == registration.inference_url
        ]:
            log.warning("dropping stale task %s (re-issued to %s)", stale.work_id,
                        registration.work_id)
            del self._tasks[stale.number]
            stale.channel.stop(self.config.stop_timeout)
        work_id = registration.work_id
        inputs = {"": registration.inference_url}
        try:
            for upstream in task_config.upstream_inputs:
                inputs[upstream] = self._upstream_url(upstream, work_id)
            channel = TaskChannel(work_id, registration.output_url, dir_mode=self.config.dir_mode)
            task = Task(registration, task_config, channel, clock=self._clock)
            try:
                channel.start(functools.partial(self._hooks.handle_message, task),
                              on_lost=functools.partial(self.call_soon, self._lost, task))
            except (OSError, TimeoutError) as exc:  # OSError: EndpointError too
                raise UnitError(ErrorCode.UNIT_RESOURCE, f"cannot bind output: {exc}") from exc
        except UnitError as exc:
            self._release(work_id)
            self._reply(url, rid, self.unit_name, error=exc)
            return
        self._tasks[registration.number] = task
        object_ = text_of(msg.get("object"))
        channel.call_soon(self._finish_setup, task, url, rid, object_, data, inputs)

    def _exit(self, url: str, raw: bytes) -> None:
        target = self._target(url, raw)
        if target is None:
            return
        _, rid, task = target
        del self._tasks[task.number]
        finished = task.channel.submit(self._exit_on_worker, task)
        # Waiting for a busy worker happens on a thread of its own: meanwhile the control
        # thread serves the other tasks' actions. The release and the answer come back here.
        threading.Thread(
            target=self._await_exit,
            args=(task, finished, url, rid),
            name=f"exit:{task.work_id}",
            daemon=True,
        ).start()

    def _await_exit(
        self, task: Task, finished: concurrent.futures.Future, url: str, rid: str
    ) -> None:
        try:
            finished.result(self.config.stop_timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            log.warning("task %s: worker busy at exit; stopping it anyway", task.work_id)
        task.channel.stop(self.config.stop_timeout)
        self.call_soon(self._exited, task, url, rid)

    def _exited(self, task: Task, url: str, rid: str) -> None:
        # Released before answering, so a client that saw the answer finds the work id gone.
        self._release(task.work_id)
        self._reply(url, rid, task.work_id)

    def _lost(self, task: Task) -> None:
        """The task's link to the unit manager closed (see :mod:`edgellm.unit.channel`): the
        manager released it or is gone. It ends as with ``exit`` (its generations end with
        their terminal piece), but its work id is not released: the manager no longer has
        it, and one that restarted may have handed that id to a new task."""
        if self._tasks.get(task.number) is not task:
            return  # exited or dropped already
        del self._tasks[task.number]
        log.warning("task %s ended: the unit manager released it or went away", task.work_id)
        self._ending.add(task)
        task.channel.call_soon(self._end_lost_on_worker, task)

    def _taskinfo(self, url: str, raw: bytes) -> None:
        msg, rid = parse_request(raw)
        work_id = text_of(msg.get("work_id")) if msg is not None else ""
        if msg is not None and "." not in work_id:
            work_ids = [task.work_id for task in self.tasks()]
            self._reply(url, rid, work_id, f"{self.unit_name}.tasklist", work_ids)
            return
        target = self._target(url, raw)
        if target is None:
            return
        _, rid, task = target
        task.channel.call_soon(task.retarget, url, rid)
        info = self._hooks.task_info(task)
        self._reply(url, rid, task.work_id, f"{self.unit_name}.taskinfo", info)

    def _unit_action(self, action: str, url: str, raw: bytes) -> None:
        """One of the unit's own actions, on the unit (``llm``) or one of its tasks. Unlike
        ``taskinfo`` it does not make the asker the task's current client: a side query
        (``stats`` from a router) must not take a task's outputs away from its client."""
        msg, rid = parse_request(raw)
        if msg is None:
            self._reply(url, rid, self.unit_name, error=UnitError(ErrorCode.JSON_FORMAT))
            return
        work_id = text_of(msg.get("work_id")) or self.unit_name
        if work_id != self.unit_name and self._task_for(work_id) is None:
            self._reply(url, rid, work_id, error=UnitError(ErrorCode.UNIT_NOT_EXIST))
            return
        try:
            object_, data = self._hooks.unit_action(action, work_id, msg.get("data"))
        except UnitError as exc:
            self._reply(url, rid, work_id, error=exc)
            return
        except Exception as exc:
            log.exception("unit %s: action %s failed", self.unit_name, action)
            error = UnitError(ErrorCode.MODEL_RUN, f"{action} failed: {exc}")
            self._reply(url, rid, work_id, error=error)
            return
        self._reply(url, rid, work_id, object_, data)

    def _hook_action(self, hook: str, url: str, raw: bytes) -> None:
        """``pause``/``work``: the unit's hook runs here, where it can reach a busy task."""
        target = self._target(url, raw)
        if target is None:
            return
        msg, rid, task = target
        task.channel.call_soon(task.retarget, url, rid)
        try:
            getattr(self._hooks, hook)(task, msg.get("data"))
        except UnitError as exc:
            self._reply(url, rid, task.work_id, error=exc)
            return
        self._reply(url, rid, task.work_id)

    def _relink(self, url: str, raw: bytes, *, link: bool) -> None:
        """``link``/``unlink``: data is the work id whose output to (stop) take as input.
        The look-up happens here; the task's worker (re)subscribes and answers."""
        target = self._target(url, raw)
        if target is None:
            return
        msg, rid, task = target
        upstream = msg.get("data")
        try:
            if not isinstance(upstream, str) or not WORK_ID_RE.match(upstream):
                raise UnitError(ErrorCode.LINK, "data must be the work id of a task")
            source_url = self._upstream_url(upstream, task.work_id) if link else ""
        except UnitError as exc:
            task.channel.call_soon(task.retarget, url, rid)
            self._reply(url, rid, task.work_id, error=exc)
            return
        task.channel.call_soon(self._relink_on_worker, task, upstream, source_url, url, rid)

    # -- completions on the task's worker ------------------------------------------------

    def _finish_setup(
        self, task: Task, url: str, rid: str, object_: str, data: Any, inputs: dict[str, str]
    ) -> None:
        task.retarget(url, rid)
        try:
            late = task.channel.subscribe(inputs, self.config.subscribe_timeout)
            if late:
                log.warning("task %s: inputs not connected yet: %s", task.work_id, late)
            self._hooks.setup_task(task, object_, data)
        except Exception as exc:
            if isinstance(exc, UnitError):
                error = exc
            elif isinstance(exc, EndpointError):
                error = UnitError(ErrorCode.UNIT_RESOURCE, f"cannot subscribe: {exc}")
            else:
                log.exception("task %s: setup failed", task.work_id)
                error = UnitError(ErrorCode.MODEL_LOADING, f"{type(exc).__name__}: {exc}")
            self.call_soon(self._drop, task)  # before answering: no action sees it alive
            task.reply_error(error, work_id=self.unit_name)
            return
        task.reply()

    def _exit_on_worker(self, task: Task) -> None:
        try:
            self._hooks.exit_task(task)
        except Exception:
            log.exception("task %s: exit hook failed", task.work_id)
        task.channel.stop()

    def _end_lost_on_worker(self, task: Task) -> None:
        self._exit_on_worker(task)
        self.call_soon(self._ending.discard, task)

    def _relink_on_worker(
        self, task: Task, upstream: str, source_url: str, url: str, rid: str
    ) -> None:
        task.retarget(url, rid)
        if source_url:
            try:
                late = task.channel.subscribe(
                    {upstream: source_url}, self.config.subscribe_timeout
                )
            except EndpointError as exc:
                task.reply_error(UnitError(ErrorCode.LINK, f"cannot subscribe: {exc}"))
                return
            if late:
                log.warning("task %s: %s not connected yet", task.work_id, upstream)
            task.config = task.config.with_input(upstream)
        else:
            task.channel.unsubscribe(upstream)
            task.config = task.config.without_input(upstream)
        task.reply()
