"""The base class of a unit (upstream's ``StackFlow``).

A unit serves ``rpc.<name>`` with the actions ``setup``, ``pause``, ``work``, ``exit``,
``taskinfo``, ``link`` and ``unlink``. Each action's data is ``set_param(client_url,
original_json)``; the RPC thread only unpacks and enqueues it and replies ``None`` at
once (upstream's contract); the real answer is pushed to ``client_url`` later.

Threads (upstream runs every handler on one event loop; here a slow task stalls nobody):

- the RPC server thread: validate, enqueue, reply ``None``;
- the control thread: runs the actions in arrival order, talks to the unit manager's
  ``sys`` service (register/release, ``<work_id>.out_port`` look-ups);
- one worker thread per task (:class:`~edgellm.unit.channel.TaskChannel`): its sockets,
  its inference requests, its outputs, and the unit's own setup of that task.

A unit author subclasses :class:`Unit` and overrides plain methods, all optional but
:meth:`Unit.inference`: :meth:`setup_task` (worker; raise :class:`UnitError` to refuse),
:meth:`inference` (worker), :meth:`inference_data` (worker: the request's data before
streamed pieces are gathered, for units that take structured data), :meth:`on_upstream`
(worker), :meth:`exit_task` (worker), :meth:`pause_task` / :meth:`work_task` (control
thread: they may need to interrupt the worker) and :meth:`task_info`. Actions of its own
beyond upstream's (the llm unit's ``stats``) are named in :attr:`Unit.EXTRA_ACTIONS` and
answered by :meth:`unit_action` on the control thread. Or pass plain functions with the
same names and arguments (without ``self``) to the constructor::

    Unit(UnitConfig(name="upper"),
         inference=lambda task, text: task.send(task.config.response_format, text.upper()))

The path of a client's inference, top to bottom::

    unit manager's XPUB -> the task's SUB (TaskChannel, the task's worker thread)
      -> Unit.handle_message -> Unit.inference -> Task.piece / finish / send
      -> the task's PUB (chained tasks) and, with enoutput, PUSH to the client's zmq_com

and of an action: ``rpc.<name>`` (RpcServer thread: unpack, reply ``None``) -> Control
(one thread, in order) -> the task's worker when it touches the task's sockets -> the
answer PUSHed to the client.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable, ClassVar

from edgellm.comm.rpc import RpcDispatcher
from edgellm.comm.rpc_thread import RpcServer, probe
from edgellm.comm.sys_client import SysClient, SysError
from edgellm.comm.urls import endpoint_exists
from edgellm.protocol.errors import ErrorCode
from edgellm.protocol.params import ParamError, split_params
from edgellm.protocol.rpc import LIST_ACTION
from edgellm.unit.config import UnitConfig, UnitError
from edgellm.unit.control import Control, Hooks
from edgellm.unit.manager_link import withdraw
from edgellm.unit.request import text_of
from edgellm.unit.stream import StreamIndexError
from edgellm.unit.task import NONE, Task

log = logging.getLogger(__name__)

ACTIONS = ("setup", "pause", "work", "exit", "taskinfo", "link", "unlink")
HOOKS = (
    "setup_task", "inference", "inference_data", "on_upstream", "exit_task", "pause_task",
    "work_task", "task_info", "unit_action", "manager_up",
)


class Unit:
    """A unit process's tasks, RPC service and control loop.

    ``EXTRA_ACTIONS``: actions this unit serves beyond upstream's (:data:`ACTIONS`), each
    answered by :meth:`unit_action`.

    ``start()`` binds ``rpc.<name>`` (refusing if a live unit already serves that name)
    and returns; ``stop()`` is idempotent: it stops taking actions, stops every task,
    releases their work ids at the unit manager (best effort) and removes its files.
    """

    EXTRA_ACTIONS: ClassVar[tuple[str, ...]] = ()
    """The unit's own RPC actions beside :data:`ACTIONS` (e.g. ``("stats", "tokenize")``).
    Each is handled like ``taskinfo``: on the control thread, in arrival order, for the
    unit (work id ``<name>``) or one of its tasks (``<name>.<n>``, -6 if unknown), and
    answered with what :meth:`unit_action` returns."""

    def __init__(self, config: UnitConfig, **handlers: Callable):
        unknown = set(handlers) - set(HOOKS)
        if unknown:
            raise TypeError(f"not a unit hook: {sorted(unknown)}; hooks are {HOOKS}")
        clash = set(self.EXTRA_ACTIONS) & {*ACTIONS, LIST_ACTION}
        if clash:
            raise TypeError(f"EXTRA_ACTIONS {sorted(clash)} are standard actions")
        for hook, fn in handlers.items():
            setattr(self, hook, fn)  # an instance attribute shadows the method
        self.config = config
        self.name = config.name
        hooks = Hooks(self.setup_task, self.exit_task, self.task_info, self.pause_task,
                      self.work_task, self.unit_action, self.handle_message,
                      self.manager_up)  # fmt: skip
        dispatcher = RpcDispatcher()
        for action in (*ACTIONS, *self.EXTRA_ACTIONS):
            dispatcher.register(action, functools.partial(self._accept, action))
        self._rpc = RpcServer(self.name, dispatcher, runtime_dir=config.runtime_dir,
                              dir_mode=config.dir_mode)  # fmt: skip
        registration = {"pid": os.getpid(), "rpc_url": self._rpc.url,
                        "actions": [*ACTIONS, *self.EXTRA_ACTIONS]}  # fmt: skip
        self._control = Control(config, hooks, self._new_sys_client(),
                                extra_actions=tuple(self.EXTRA_ACTIONS),
                                registration=registration)  # fmt: skip
        self._started = False
        self._stopped = False

    @property
    def rpc_url(self) -> str:
        return self._rpc.url

    def tasks(self) -> list[Task]:
        """The tasks alive now, by work id number (a snapshot)."""
        return self._control.tasks()

    # -- hooks for unit authors ----------------------------------------------------------

    def setup_task(self, task: Task, object_: str, data: Any) -> None:
        """Prepare a new task (load its model...). Runs on the task's worker after its
        inputs are subscribed; raise :class:`UnitError` to refuse (the work id is then
        released). ``task.config`` holds the parsed standard fields."""

    def inference(self, task: Task, text: str) -> None:
        """Answer one input text with :meth:`Task.piece`/:meth:`Task.finish` (stream) or
        :meth:`Task.send`. Runs on the task's worker; raise :class:`UnitError` to fail."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION, "this unit does no inference")

    def inference_data(self, task: Task, object_: Any, data: Any) -> None:
        """One client inference request's data (not empty; the task is not paused). Default:
        gather streamed pieces (``object`` naming a stream) until ``finish``, or take a
        string (other data as JSON text), then :meth:`inference`. Runs on the task's worker;
        raise :class:`UnitError` to answer an error."""
        if isinstance(object_, str) and "stream" in object_:
            try:
                text = task.assembler("").feed(data)
            except StreamIndexError as exc:
                raise UnitError(ErrorCode.STREAM_INDEX, str(exc)) from None
            if text is None:
                return  # more pieces to come
        elif isinstance(data, str):
            text = data
        else:
            text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        self.inference(task, text)

    def unit_action(self, action: str, work_id: str, data: Any) -> tuple[str, Any]:
        """Answer one of :attr:`EXTRA_ACTIONS` (``work_id``: the unit's name or one of its
        live tasks' work ids); returns the answer's ``(object, data)``. Runs on the control
        thread: keep it quick. Raise :class:`UnitError` to answer an error."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION, action)

    def manager_up(self) -> None:
        """A unit manager is up: the one met at start, or one that (re)started later (the
        tasks of a previous one have ended). The unit has just registered under its name;
        publish again whatever else the unit keeps in the manager's store. Runs on the
        control thread: keep it quick (hand long work to a thread of the unit's own)."""

    def on_upstream(self, task: Task, source: str, envelope: dict[str, Any]) -> None:
        """An output envelope of the task ``source`` this task takes as input. Default:
        skip errors, reassemble streams, and run :meth:`inference` on the text."""
        error = envelope.get("error")
        if isinstance(error, dict) and error.get("code", 0) != 0:
            return
        object_ = envelope.get("object")
        data = envelope.get("data")
        try:
            if isinstance(object_, str) and "stream" in object_:
                text = task.assembler(source).feed(data)
                if text is None:
                    return
            elif isinstance(data, str):
                text = data
            else:
                return
            self.inference(task, text)
        except (StreamIndexError, UnitError) as exc:
            log.warning("task %s: input from %s dropped: %s", task.work_id, source, exc)

    def exit_task(self, task: Task) -> None:
        """Release what :meth:`setup_task` acquired. Runs on the worker; errors are logged."""

    def pause_task(self, task: Task, data: Any) -> None:
        """``pause``; runs on the control thread. Default: not supported (-18)."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION)

    def work_task(self, task: Task, data: Any) -> None:
        """``work``; runs on the control thread. Default: not supported (-18)."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION)

    def task_info(self, task: Task) -> Any:
        """The ``data`` of ``taskinfo`` on one task (upstream: model, response_format,
        enoutput, inputs)."""
        return task.config.info()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "Unit":
        if self._started:
            raise RuntimeError(f"unit {self.name} already started")
        self._started = True
        if self._serving_elsewhere():
            raise RuntimeError(f"a unit already serves {self.rpc_url}")
        self._control.start()
        try:
            self._rpc.start()
        except BaseException:
            self._control.stop(self.config.stop_timeout)
            raise
        log.info("unit %s serving %s", self.name, self.rpc_url)
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        budget_end = time.monotonic() + self.config.stop_timeout
        self._rpc.stop()
        clean = self._control.stop(max(0.05, budget_end - time.monotonic()))
        tasks, ending = self._control.take_tasks()  # ending: lost to the manager, not released
        for task in tasks:
            task.channel.stop(0)
        for task in tasks + ending:
            clean &= task.channel.stop(max(0.05, budget_end - time.monotonic()))
        with self._new_sys_client() as sys_client:
            if not endpoint_exists(sys_client.url):
                if tasks:
                    log.warning("unit manager gone; %d work id(s) not released", len(tasks))
                tasks = []
            for task in tasks:
                remaining = budget_end - time.monotonic()
                if remaining <= 0:
                    log.warning("no time left to release %s", task.work_id)
                    continue
                try:
                    sys_client.release_unit(task.work_id, deadline=min(0.5, remaining))
                except SysError as exc:
                    log.warning("release of %s failed: %s", task.work_id, exc)
            if endpoint_exists(sys_client.url) and budget_end > time.monotonic():
                withdraw(sys_client, self.name, min(0.5, budget_end - time.monotonic()))
        if not clean:
            log.warning("unit %s: a thread did not stop within %.1fs", self.name,
                        self.config.stop_timeout)  # fmt: skip
        log.info("unit %s stopped", self.name)

    def __enter__(self) -> "Unit":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _serving_elsewhere(self) -> bool:
        # A stale file of a dead unit does not answer: binding replaces it.
        return probe(self.rpc_url, timeout=0.5) is not None

    def _new_sys_client(self) -> SysClient:
        return SysClient(
            runtime_dir=self.config.runtime_dir,
            call_timeout=self.config.sys_call_timeout,
            retry_deadline=self.config.sys_retry_deadline,
        )

    # -- RPC thread ----------------------------------------------------------------------

    def _accept(self, action: str, data: bytes) -> str:
        try:
            client_url, raw = split_params(data)
            url = client_url.decode("utf-8")
        except (ParamError, UnicodeDecodeError) as exc:
            log.warning("%s: unreadable request (%s); nobody to answer", action, exc)
            return NONE
        if not self._control.put(action, url, raw):
            log.warning("%s for %s arrived while stopping: dropped", action, url)
        return NONE

    # -- task worker threads ------------------------------------------------------------

    def handle_message(self, task: Task, source: str, raw: bytes) -> None:
        """Every input message of a task, on its worker: one ``json.loads``, then the
        client's request (``source`` empty) or an upstream task's output. Override
        :meth:`inference` / :meth:`on_upstream` rather than this."""
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser
            log.warning("task %s: unreadable message from %r dropped", task.work_id, source)
            return
        if type(msg) is not dict:
            return
        if source:
            self.on_upstream(task, source, msg)
            return
        if "action" in msg:
            if msg.get("work_id") != task.work_id:
                log.warning("task %s: request for %r ignored", task.work_id, msg.get("work_id"))
                return
            zmq_com = msg.get("zmq_com")
            rid = msg.get("request_id")
            task.retarget(
                zmq_com if type(zmq_com) is str else "", rid if type(rid) is str else text_of(rid)
            )
        self._client_input(task, msg.get("object"), msg.get("data"))

    def _client_input(self, task: Task, object_: Any, data: Any) -> None:
        try:
            if task.paused:
                raise UnitError(ErrorCode.NOT_WORKING, "task is paused")
            if data is None or data == "" or data == NONE:
                raise UnitError(ErrorCode.EMPTY_INFERENCE)
            self.inference_data(task, object_, data)
        except UnitError as exc:
            task.reply_error(exc)
        except Exception:
            log.exception("task %s: inference failed", task.work_id)
            task.reply_error(UnitError(ErrorCode.MODEL_RUN))
