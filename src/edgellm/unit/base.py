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
:meth:`inference` (worker), :meth:`on_upstream` (worker), :meth:`exit_task` (worker),
:meth:`pause_task` / :meth:`work_task` (control thread: they may need to interrupt the
worker) and :meth:`task_info`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import queue
import threading
import time
from typing import Any, Callable

import zmq

from edgellm.comm.rpc import RpcClient, RpcDispatcher, RpcServer, RpcTimeout, RpcUnavailable
from edgellm.comm.urls import endpoint_exists
from edgellm.protocol.envelope import encode, make_response
from edgellm.protocol.errors import ErrorCode
from edgellm.protocol.params import ParamError, split_params
from edgellm.unit.channel import TaskChannel
from edgellm.unit.config import WORK_ID_RE, TaskConfig, UnitConfig, UnitError
from edgellm.unit.outbox import Outbox
from edgellm.unit.stream import StreamIndexError
from edgellm.unit.sys_client import SysClient, SysError
from edgellm.unit.task import NONE, Task

log = logging.getLogger(__name__)

ACTIONS = ("setup", "pause", "work", "exit", "taskinfo", "link", "unlink")
_DROP = "_drop"  # internal control message: a setup failed on the worker


def _text(value: Any) -> str:
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
    except ValueError:
        return None, "0"
    if not isinstance(msg, dict):
        return None, "0"
    return msg, _text(msg.get("request_id"))


class Unit:
    """A unit process's tasks, RPC service and control loop.

    ``start()`` binds ``rpc.<name>`` (refusing if a live unit already serves that name)
    and returns; ``stop()`` is idempotent: it stops taking actions, stops every task,
    releases their work ids at the unit manager (best effort) and removes its files.
    """

    def __init__(self, config: UnitConfig, *, ctx: zmq.Context | None = None):
        self.config = config
        self.name = config.name
        self._own_ctx = ctx is None
        self._ctx = zmq.Context() if ctx is None else ctx
        self._tasks: dict[int, Task] = {}
        self._control: queue.SimpleQueue = queue.SimpleQueue()
        self._control_thread = threading.Thread(
            target=self._control_loop, name=f"unit:{self.name}", daemon=True
        )
        dispatcher = RpcDispatcher()
        for action in ACTIONS:
            dispatcher.register(action, functools.partial(self._accept, action))
        self._rpc = RpcServer(
            self.name,
            dispatcher,
            runtime_dir=config.runtime_dir,
            ctx=self._ctx,
            dir_mode=config.dir_mode,
        )
        self._handlers: dict[str, Callable[[str, bytes], None]] = {
            "setup": self._setup,
            "exit": self._exit,
            "taskinfo": self._taskinfo,
            "pause": functools.partial(self._task_action, self.pause_task),
            "work": functools.partial(self._task_action, self.work_task),
            "link": self._link,
            "unlink": self._unlink,
        }
        # Owned by the control thread.
        self._sys = self._new_sys_client()
        self._outbox = Outbox(self._ctx)
        self._started = False
        self._stopped = False

    @property
    def rpc_url(self) -> str:
        return self._rpc.url

    def tasks(self) -> list[Task]:
        """The tasks alive now, by work id number (a snapshot)."""
        snapshot = dict(self._tasks)  # one C-level copy: safe against the control thread
        return [snapshot[n] for n in sorted(snapshot)]

    # -- hooks for unit authors ----------------------------------------------------------

    def setup_task(self, task: Task, object_: str, data: Any) -> None:
        """Prepare a new task (load its model...). Runs on the task's worker after its
        inputs are subscribed; raise :class:`UnitError` to refuse (the work id is then
        released). ``task.config`` holds the parsed standard fields."""

    def inference(self, task: Task, text: str) -> None:
        """Answer one input text with :meth:`Task.piece`/:meth:`Task.finish` (stream) or
        :meth:`Task.send`. Runs on the task's worker; raise :class:`UnitError` to fail."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION, "this unit does no inference")

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
        self._control_thread.start()
        try:
            self._rpc.start()
        except BaseException:
            self._control.put(None)
            self._control_thread.join()
            raise
        log.info("unit %s serving %s", self.name, self.rpc_url)
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        budget_end = time.monotonic() + self.config.stop_timeout
        self._rpc.stop()
        clean = True
        if self._control_thread.is_alive():
            self._control.put(None)
            self._control_thread.join(max(0.05, budget_end - time.monotonic()))
            clean = not self._control_thread.is_alive()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.channel.stop(0)
        for task in tasks:
            clean &= task.channel.stop(max(0.05, budget_end - time.monotonic()))
        if tasks:
            with self._new_sys_client() as sys_client:
                if not endpoint_exists(sys_client.url):
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
        if not self._control_thread.is_alive() and not self._control_thread.ident:
            self._sys.close()  # never started: the control thread did not close them
            self._outbox.close()
        if self._own_ctx and clean:
            self._ctx.term()
        log.info("unit %s stopped", self.name)

    def __enter__(self) -> "Unit":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _serving_elsewhere(self) -> bool:
        if not endpoint_exists(self.rpc_url):
            return False
        with RpcClient(self.rpc_url, timeout=0.5, ctx=self._ctx) as probe:
            try:
                probe.call("list_action")
                return True
            except (RpcTimeout, RpcUnavailable):
                return False  # a stale file of a dead unit: binding replaces it

    def _new_sys_client(self) -> SysClient:
        return SysClient(
            runtime_dir=self.config.runtime_dir,
            call_timeout=self.config.sys_call_timeout,
            retry_deadline=self.config.sys_retry_deadline,
            ctx=self._ctx,
        )

    # -- RPC thread ----------------------------------------------------------------------

    def _accept(self, action: str, data: bytes) -> str:
        try:
            client_url, raw = split_params(data)
            url = client_url.decode("utf-8")
        except (ParamError, UnicodeDecodeError) as exc:
            log.warning("%s: unreadable request (%s); nobody to answer", action, exc)
            return NONE
        self._control.put((action, url, raw))
        return NONE

    # -- control thread ------------------------------------------------------------------

    def _control_loop(self) -> None:
        try:
            while True:
                item = self._control.get()
                if item is None:
                    return
                kind, url, raw = item
                try:
                    if kind == _DROP:
                        self._drop(url)
                    else:
                        self._handlers[kind](url, raw)
                except Exception:
                    log.exception("unit %s: %s failed", self.name, kind)
        finally:
            self._sys.close()
            self._outbox.close()

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
        envelope = make_response(request_id, work_id, object_, data, code, message)
        self._outbox.send(url, encode(envelope))

    def _task_for(self, work_id: str) -> Task | None:
        match = WORK_ID_RE.match(work_id)
        if match is None or match.group(1) != self.name:
            return None
        return self._tasks.get(int(match.group(2)))

    def _setup(self, url: str, raw: bytes) -> None:
        msg, rid = _parse(raw)
        if msg is None:
            self._reply(url, rid, self.name, error=UnitError(ErrorCode.JSON_FORMAT))
            return
        if len(self._tasks) >= self.config.max_tasks:
            error = UnitError(ErrorCode.TASK_FULL, f"{self.config.max_tasks} tasks running")
            self._reply(url, rid, self.name, error=error)
            return
        data = msg.get("data")
        try:
            if isinstance(data, str):  # setup data sent as JSON text
                try:
                    data = json.loads(data)
                except ValueError:
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
        stale = self._tasks.pop(registration.number, None)
        if stale is not None:
            # The unit manager restarted and re-issued this work id: the old task is gone
            # for it, so it must not be released (that would free the new one).
            log.warning("dropping stale task %s (work id re-issued)", stale.work_id)
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
                channel.start(functools.partial(self._on_message, task))
            except (zmq.ZMQError, OSError, TimeoutError) as exc:
                raise UnitError(ErrorCode.UNIT_RESOURCE, f"cannot bind output: {exc}") from exc
        except UnitError as exc:
            self._release(work_id)
            self._reply(url, rid, self.name, error=exc)
            return
        self._tasks[registration.number] = task
        channel.call_soon(self._finish_setup, task, url, rid, _text(msg.get("object")), data, inputs)

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

    def _exit(self, url: str, raw: bytes) -> None:
        msg, rid = _parse(raw)
        if msg is None:
            self._reply(url, rid, self.name, error=UnitError(ErrorCode.JSON_FORMAT))
            return
        work_id = _text(msg.get("work_id"))
        task = self._task_for(work_id)
        if task is None:
            self._reply(url, rid, work_id, error=UnitError(ErrorCode.UNIT_NOT_EXIST))
            return
        del self._tasks[task.number]
        finished = task.channel.submit(self._exit_on_worker, task)
        try:
            finished.result(self.config.stop_timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            log.warning("task %s: worker busy at exit; stopping it anyway", task.work_id)
        task.channel.stop(self.config.stop_timeout)
        # Released before answering, so a client that saw the answer finds the work id gone.
        self._release(task.work_id)
        self._reply(url, rid, task.work_id)

    def _taskinfo(self, url: str, raw: bytes) -> None:
        msg, rid = _parse(raw)
        if msg is None:
            self._reply(url, rid, self.name, error=UnitError(ErrorCode.JSON_FORMAT))
            return
        work_id = _text(msg.get("work_id"))
        if "." not in work_id:
            work_ids = [task.work_id for task in self.tasks()]
            self._reply(url, rid, work_id, f"{self.name}.tasklist", work_ids)
            return
        task = self._task_for(work_id)
        if task is None:
            self._reply(url, rid, work_id, error=UnitError(ErrorCode.UNIT_NOT_EXIST))
            return
        task.channel.call_soon(task.retarget, url, rid)
        self._reply(url, rid, work_id, f"{self.name}.taskinfo", self.task_info(task))

    def _task_action(self, hook: Callable[[Task, Any], None], url: str, raw: bytes) -> None:
        msg, rid = _parse(raw)
        if msg is None:
            self._reply(url, rid, self.name, error=UnitError(ErrorCode.JSON_FORMAT))
            return
        work_id = _text(msg.get("work_id"))
        task = self._task_for(work_id)
        if task is None:
            self._reply(url, rid, work_id, error=UnitError(ErrorCode.UNIT_NOT_EXIST))
            return
        task.channel.call_soon(task.retarget, url, rid)
        try:
            hook(task, msg.get("data"))
        except UnitError as exc:
            self._reply(url, rid, work_id, error=exc)
            return
        self._reply(url, rid, work_id)

    def _link(self, url: str, raw: bytes) -> None:
        self._relink(url, raw, link=True)

    def _unlink(self, url: str, raw: bytes) -> None:
        self._relink(url, raw, link=False)

    def _relink(self, url: str, raw: bytes, *, link: bool) -> None:
        """``link``/``unlink``: data is the work id whose output to (stop) take as input."""
        msg, rid = _parse(raw)
        if msg is None:
            self._reply(url, rid, self.name, error=UnitError(ErrorCode.JSON_FORMAT))
            return
        work_id = _text(msg.get("work_id"))
        task = self._task_for(work_id)
        if task is None:
            self._reply(url, rid, work_id, error=UnitError(ErrorCode.UNIT_NOT_EXIST))
            return
        task.channel.call_soon(task.retarget, url, rid)
        upstream = msg.get("data")
        try:
            if not isinstance(upstream, str) or not WORK_ID_RE.match(upstream):
                raise UnitError(ErrorCode.LINK, "data must be the work id of a task")
            if link:
                source_url = self._upstream_url(upstream, task.work_id)
                done = task.channel.submit(
                    task.channel.subscribe, {upstream: source_url}, self.config.subscribe_timeout
                )
                task.config = task.config.with_input(upstream)
            else:
                done = task.channel.submit(task.channel.unsubscribe, upstream)
                task.config = task.config.without_input(upstream)
            try:
                done.result(self.config.subscribe_timeout + self.config.stop_timeout)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                raise UnitError(ErrorCode.LINK, "task did not respond") from None
        except UnitError as exc:
            self._reply(url, rid, work_id, error=exc)
            return
        self._reply(url, rid, work_id)

    # -- task worker threads ------------------------------------------------------------

    def _finish_setup(
        self, task: Task, url: str, rid: str, object_: str, data: Any, inputs: dict[str, str]
    ) -> None:
        task.retarget(url, rid)
        late = task.channel.subscribe(inputs, self.config.subscribe_timeout)
        if late:
            log.warning("task %s: inputs not connected yet: %s", task.work_id, late)
        try:
            self.setup_task(task, object_, data)
        except Exception as exc:
            error = exc if isinstance(exc, UnitError) else UnitError(ErrorCode.MODEL_LOADING)
            if not isinstance(exc, UnitError):
                log.exception("task %s: setup failed", task.work_id)
            task.reply_error(error, work_id=self.name)
            self._control.put((_DROP, task, b""))
            return
        task.ready = True
        task.reply()

    def _exit_on_worker(self, task: Task) -> None:
        try:
            self.exit_task(task)
        except Exception:
            log.exception("task %s: exit hook failed", task.work_id)
        task.channel.stop()

    def _on_message(self, task: Task, source: str, raw: bytes) -> None:
        """Every input message of a task: one ``json.loads``, then dispatch."""
        try:
            msg = json.loads(raw)
        except ValueError:
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
                zmq_com if type(zmq_com) is str else "", rid if type(rid) is str else _text(rid)
            )
        self._client_input(task, msg.get("object"), msg.get("data"))

    def _client_input(self, task: Task, object_: Any, data: Any) -> None:
        try:
            if task.paused:
                raise UnitError(ErrorCode.NOT_WORKING, "task is paused")
            if data is None or data == "" or data == NONE:
                raise UnitError(ErrorCode.EMPTY_INFERENCE)
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
        except UnitError as exc:
            task.reply_error(exc)
        except Exception:
            log.exception("task %s: inference failed", task.work_id)
            task.reply_error(UnitError(ErrorCode.MODEL_RUN))
