"""The control thread of a unit: the actions, in arrival order (upstream's event loop).

:class:`Control` owns the task table, the ``sys`` client and an outbox for replies. It
talks to the unit manager (register/release, ``<work_id>.out_port`` look-ups) and creates
and stops tasks; what must happen on a task's own sockets (subscribing, the unit's setup
of the task, answering a link) it hands to that task's worker, so a busy task never holds
up the control thread for long and never shares a socket.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable

import zmq

from edgellm.protocol.envelope import encode, make_response
from edgellm.protocol.errors import ErrorCode
from edgellm.unit.channel import TaskChannel
from edgellm.unit.config import WORK_ID_RE, TaskConfig, UnitError
from edgellm.unit.outbox import Outbox
from edgellm.unit.sys_client import SysClient, SysError
from edgellm.unit.task import NONE, Task

if TYPE_CHECKING:
    from edgellm.unit.base import Unit

log = logging.getLogger(__name__)

def text_of(value: Any) -> str:
    """A JSON value as upstream's ``sample_json_str_get`` would give it (strings bare)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """The request object and its request_id (``"0"`` when unreadable, as upstream)."""
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError):
        return None, "0"
    if not isinstance(msg, dict):
        return None, "0"
    return msg, text_of(msg.get("request_id"))


class Control:
    """Runs a unit's actions on one thread. ``put()`` is thread-safe; ``stop()`` ends the
    thread after the action in progress and returns whether it ended in time."""

    def __init__(self, unit: "Unit", ctx: zmq.Context, sys_client: SysClient):
        self.unit = unit
        self.name = unit.name
        self.config = unit.config
        self.tasks: dict[int, Task] = {}
        """By work id number. Written only on the control thread (or after it ended)."""
        self._ctx = ctx
        self._sys = sys_client
        self._outbox = Outbox(ctx)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"unit:{self.name}", daemon=True)
        self._actions: dict[str, Callable[[str, bytes], None]] = {
            "setup": self._setup,
            "exit": self._exit,
            "taskinfo": self._taskinfo,
            "pause": functools.partial(self._hook_action, "pause_task"),
            "work": functools.partial(self._hook_action, "work_task"),
            "link": functools.partial(self._relink, link=True),
            "unlink": functools.partial(self._relink, link=False),
        }
        for action in unit.EXTRA_ACTIONS:
            self._actions[action] = functools.partial(self._unit_action, action)

    def start(self) -> None:
        self._thread.start()

    def put(self, action: str, url: str, raw: bytes) -> None:
        self._queue.put((action, url, raw))

    def stop(self, timeout: float) -> bool:
        if self._thread.ident is None:  # never started: nobody else will close these
            self._sys.close()
            self._outbox.close()
            return True
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                action, url, raw = item
                try:
                    if callable(action):  # internal: (fn, args, None) from another thread
                        action(*url)
                    else:
                        self._actions[action](url, raw)
                except Exception:
                    log.exception("unit %s: %s failed", self.name, action)
        finally:
            self._sys.close()
            self._outbox.close()

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
        self._outbox.send(url, encode(make_response(request_id, work_id, object_, data, code, message)))

    def _task_for(self, work_id: str) -> Task | None:
        match = WORK_ID_RE.match(work_id)
        if match is None or match.group(1) != self.name:
            return None
        return self.tasks.get(int(match.group(2)))

    def _target(self, url: str, raw: bytes) -> tuple[dict[str, Any], str, Task] | None:
        """Parse a request naming one task; answer -2/-6 and return None if it cannot."""
        msg, rid = _parse(raw)
        if msg is None:
            self._reply(url, rid, self.name, error=UnitError(ErrorCode.JSON_FORMAT))
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
        if self.tasks.get(task.number) is task:
            del self.tasks[task.number]
            task.channel.stop(self.config.stop_timeout)
            self._release(task.work_id)

    # -- actions -------------------------------------------------------------------------

    def _setup(self, url: str, raw: bytes) -> None:
        msg, rid = _parse(raw)
        if msg is None:
            self._reply(url, rid, self.name, error=UnitError(ErrorCode.JSON_FORMAT))
            return
        if len(self.tasks) >= self.config.max_tasks:
            error = UnitError(ErrorCode.TASK_FULL, f"{self.config.max_tasks} tasks running")
            self._reply(url, rid, self.name, error=error)
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
            self._reply(url, rid, self.name, error=exc)
            return
        try:
            registration = self._sys.register_unit(self.name)
        except SysError as exc:
            self._reply(url, rid, self.name, error=UnitError(ErrorCode.UNIT_RESOURCE, str(exc)))
            return
        # A unit manager that restarted hands out work ids and urls again: a task still
        # holding one is gone for it, so drop it without releasing (that would free the
        # new one).
        for stale in [
            t for t in self.tasks.values()
            if t.number == registration.number
            or t.registration.output_url == registration.output_url
            or t.registration.inference_url == registration.inference_url
        ]:
            log.warning("dropping stale task %s (re-issued to %s)", stale.work_id,
                        registration.work_id)
            del self.tasks[stale.number]
            stale.channel.stop(self.config.stop_timeout)
        work_id = registration.work_id
        inputs = {"": registration.inference_url}
        try:
            for upstream in task_config.upstream_inputs:
                inputs[upstream] = self._upstream_url(upstream, work_id)
            channel = TaskChannel(
                self._ctx, work_id, registration.output_url, dir_mode=self.config.dir_mode
            )
            task = Task(registration, task_config, channel)
            try:
                channel.start(functools.partial(self.unit.handle_message, task))
            except (zmq.ZMQError, OSError, TimeoutError) as exc:
                raise UnitError(ErrorCode.UNIT_RESOURCE, f"cannot bind output: {exc}") from exc
        except UnitError as exc:
            self._release(work_id)
            self._reply(url, rid, self.name, error=exc)
            return
        self.tasks[registration.number] = task
        object_ = text_of(msg.get("object"))
        channel.call_soon(self._finish_setup, task, url, rid, object_, data, inputs)

    def _exit(self, url: str, raw: bytes) -> None:
        target = self._target(url, raw)
        if target is None:
            return
        _, rid, task = target
        del self.tasks[task.number]
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
        self._queue.put((self._exited, (task, url, rid), None))

    def _exited(self, task: Task, url: str, rid: str) -> None:
        # Released before answering, so a client that saw the answer finds the work id gone.
        self._release(task.work_id)
        self._reply(url, rid, task.work_id)

    def _taskinfo(self, url: str, raw: bytes) -> None:
        msg, rid = _parse(raw)
        if msg is not None and "." not in text_of(msg.get("work_id")):
            work_ids = [self.tasks[n].work_id for n in sorted(self.tasks)]
            self._reply(url, rid, text_of(msg.get("work_id")), f"{self.name}.tasklist", work_ids)
            return
        target = self._target(url, raw)
        if target is None:
            return
        _, rid, task = target
        task.channel.call_soon(task.retarget, url, rid)
        info = self.unit.task_info(task)
        self._reply(url, rid, task.work_id, f"{self.name}.taskinfo", info)

    def _unit_action(self, action: str, url: str, raw: bytes) -> None:
        """One of the unit's own actions, on the unit (``llm``) or one of its tasks."""
        msg, rid = _parse(raw)
        if msg is None:
            self._reply(url, rid, self.name, error=UnitError(ErrorCode.JSON_FORMAT))
            return
        work_id = text_of(msg.get("work_id")) or self.name
        if work_id != self.name and self._task_for(work_id) is None:
            self._reply(url, rid, work_id, error=UnitError(ErrorCode.UNIT_NOT_EXIST))
            return
        try:
            object_, data = self.unit.unit_action(action, work_id, msg.get("data"))
        except UnitError as exc:
            self._reply(url, rid, work_id, error=exc)
            return
        except Exception as exc:
            log.exception("unit %s: action %s failed", self.name, action)
            self._reply(url, rid, work_id, error=UnitError(ErrorCode.MODEL_RUN, f"{action} failed: {exc}"))
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
            getattr(self.unit, hook)(task, msg.get("data"))
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
            self.unit.setup_task(task, object_, data)
        except Exception as exc:
            if isinstance(exc, UnitError):
                error = exc
            elif isinstance(exc, zmq.ZMQError):
                error = UnitError(ErrorCode.UNIT_RESOURCE, f"cannot subscribe: {exc}")
            else:
                log.exception("task %s: setup failed", task.work_id)
                error = UnitError(ErrorCode.MODEL_LOADING)
            self._queue.put((self._drop, (task,), None))  # before answering: no action sees it alive
            task.reply_error(error, work_id=self.name)
            return
        task.reply()

    def _exit_on_worker(self, task: Task) -> None:
        try:
            self.unit.exit_task(task)
        except Exception:
            log.exception("task %s: exit hook failed", task.work_id)
        task.channel.stop()

    def _relink_on_worker(
        self, task: Task, upstream: str, source_url: str, url: str, rid: str
    ) -> None:
        task.retarget(url, rid)
        if source_url:
            try:
                late = task.channel.subscribe(
                    {upstream: source_url}, self.config.subscribe_timeout
                )
            except zmq.ZMQError as exc:
                task.reply_error(UnitError(ErrorCode.LINK, f"cannot subscribe: {exc}"))
                return
            if late:
                log.warning("task %s: %s not connected yet", task.work_id, upstream)
            task.config = task.config.with_input(upstream)
        else:
            task.channel.unsubscribe(upstream)
            task.config = task.config.without_input(upstream)
        task.reply()
