"""Dispatch of client requests (upstream ``unit_action_match``, spec 1 §3.3).

- Not a JSON object, or ``request_id`` / ``work_id`` / ``action`` missing or not strings:
  error -2, request_id ``"0"``, work_id ``"sys"``. An empty ``work_id`` means ``sys``.
- ``inference``: ``{"zmq_com":"<client url>",`` + the original text after its ``{`` is
  published on the task's inference socket (the client's own ``zmq_com``, if any, is
  dropped first, so a client cannot redirect answers to another session). Unknown work id:
  -4. The request stays open until its terminal answer (:mod:`edgellm.manager.pending`),
  unless none will come: a streamed input piece that is not the last, or any inference to
  a task whose setup said ``enoutput`` false (its outputs only feed chained tasks).
- ``sys`` actions are answered at once (:mod:`edgellm.manager.sys_actions`: ``ping``,
  ``version``, ``lsmode``, ``hwinfo``, ``cmminfo``, ``lstask``, ``lsunit``, ``reset``,
  ``reboot``), ``unit_call`` here; anything else -3.
- Any other action: RPC ``[action, set_param(zmq_com, original text)]`` to the unit named
  by the work id's first part; the unit answers "None" at once and its real answer arrives
  on the session's PULL. A task that a ``setup`` creates belongs to the connection it came
  on: it is released when that connection closes. An unreachable unit, an RPC timeout, ``NotAction`` or the unit's
  report that its handler failed: -9, saying which.

A :class:`Dispatcher` receives what it uses (the config, the unit registry, the key/value
store for the units' mode entries, the hardware sampler, a wall clock for ``created``);
the connection a request came on is a :class:`Link` (a
:class:`~edgellm.manager.session.Session` in the daemon).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Protocol

from edgellm.comm.errors import CommError
from edgellm.comm.rpc_asyncio import AsyncRpcClient
from edgellm.manager.config import ManagerConfig
from edgellm.manager.pending import PendingTable
from edgellm.manager.store import KeyValueStore
from edgellm.manager.sys_actions import SysActions
from edgellm.manager.sysinfo import HwInfo
from edgellm.manager.units import UNIT_NAME, HeldRequest, UnitRegistry
from edgellm.protocol.envelope import NO_REQUEST_ID, SYS_WORK_ID, encode_error, encode_response
from edgellm.protocol.errors import ErrorCode
from edgellm.protocol.framing import Frame
from edgellm.protocol.params import set_param
from edgellm.protocol.rpc import is_not_action

log = logging.getLogger(__name__)

HOLD_SECONDS = 2.0
"""How long an inference request waits for its task's subscriber (capped by the request
timeout): covers a unit still connecting right after setup, fails fast for a dead one."""

DETACH_GRACE = 1.0
"""Answers already in flight when a task's subscriber leaves get this long to arrive."""

MAX_OPEN_REQUESTS = 4096
"""Open (unanswered) requests per connection; beyond, new ones are refused at once, so a client
flooding a silent unit cannot grow the manager's memory until the deadlines pass."""

MAX_RPC_CLIENTS = 64
_JSON_FORMAT_HINT = "json format error: request_id, work_id and action must be strings"


def _is_input_piece(request: dict[str, Any]) -> bool:
    """A streamed input piece that is not the last (units reassemble stream objects)."""
    data = request.get("data")
    object_ = request.get("object")
    return (
        type(data) is dict
        and "finish" in data
        and not data["finish"]
        and type(object_) is str
        and "stream" in object_
    )


def _setup_enoutput(request: dict[str, Any]) -> Any:
    """The ``enoutput`` of a setup request (its data may be an object or JSON text)."""
    data = request.get("data")
    if type(data) is str:
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):
            return None
    return data.get("enoutput") if type(data) is dict else None


class Link(Protocol):
    """The client connection a request came on, as dispatch uses it."""

    client_url: str
    """Where units answer (the ``zmq_com`` of its requests)."""
    pending: PendingTable
    tasks: set[str]
    """Work ids of the tasks set up through this connection (dispatch adds them)."""

    def send(self, data: bytes) -> None:
        """Write one encoded envelope to the client."""

    def open_inbox(self) -> str | None:
        """Make :attr:`client_url` take answers; None once it does, else why it cannot."""


class Dispatcher:
    """Routes one framed request; owned by the manager's event loop thread."""

    def __init__(self, config: ManagerConfig, registry: UnitRegistry, store: KeyValueStore,
                 hwinfo: HwInfo, clock: Callable[[], float], *,
                 reboot: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.config = config
        self._registry = registry
        self._clock = clock
        self._clients: OrderedDict[str, AsyncRpcClient] = OrderedDict()
        self._sys = SysActions(config, registry, store, hwinfo, clock, reboot)

    def handle(self, link: Link, frame: Frame) -> Awaitable[None] | None:
        """Answer or forward ``frame``; returns a coroutine when an RPC must be awaited."""
        value = frame.value
        request_id = value.get("request_id")
        work_id = value.get("work_id")
        action = value.get("action")
        if type(request_id) is not str or type(work_id) is not str or type(action) is not str:
            link.send(self._error(ErrorCode.JSON_FORMAT, message=_JSON_FORMAT_HINT))
            return None
        if not work_id:
            work_id = SYS_WORK_ID
        unit = work_id.split(".", 1)[0]
        if unit != SYS_WORK_ID and len(link.pending) >= MAX_OPEN_REQUESTS:
            code = ErrorCode.INFERENCE_PUSH if action == "inference" else ErrorCode.UNIT_CALL
            text = f"{code.message}: {MAX_OPEN_REQUESTS} requests of this connection are open"
            link.send(self._error(code, request_id, work_id, text))
            return None
        if action == "inference":
            self._inference(link, frame, request_id, work_id)
            return None
        if unit == SYS_WORK_ID:
            if action == "unit_call":
                return self._sys_unit_call(link, value, request_id, work_id)
            link.send(self._sys.answer(action, request_id, work_id))
            return None
        if not UNIT_NAME.match(unit):
            link.send(
                self._error(
                    ErrorCode.UNIT_CALL,
                    request_id,
                    work_id,
                    f"unit call false: no unit named {unit!r}",
                )
            )
            return None
        return self._call_unit(link, unit, action, frame, request_id, work_id)

    # -- inference ----------------------------------------------------------------------------

    def _inference(self, link: Link, frame: Frame, request_id: str, work_id: str) -> None:
        registry = self._registry
        task = registry.get(work_id)
        if task is None:
            link.send(self._error(ErrorCode.INFERENCE_PUSH, request_id, work_id))
            return
        problem = link.open_inbox()
        if problem is not None:
            text = f"{ErrorCode.INFERENCE_PUSH.message}: {problem}"
            link.send(self._error(ErrorCode.INFERENCE_PUSH, request_id, work_id, text))
            return
        payload = self._with_zmq_com(frame, link.client_url)
        # No answer comes to a streamed input piece (finish false: the unit buffers it) nor
        # to anything sent to a task set up with enoutput false (only errors, if any).
        unanswered = not task.enoutput or _is_input_piece(frame.value)
        if unanswered and task.subscribed:
            registry.publish(task, payload)
            return
        pending = link.pending.add(
            request_id, work_id, inference=True, expects_answer=not unanswered
        )
        if task.subscribed:
            registry.publish(task, payload)
            return
        held = HeldRequest(payload, pending)
        if not registry.hold(task, held):
            link.pending.cancel(pending)
            link.send(
                self._error(
                    ErrorCode.INFERENCE_PUSH,
                    request_id,
                    work_id,
                    f"inference data push false: too many requests wait for {work_id}",
                )
            )
            return
        link.pending.hold(pending, held, HOLD_SECONDS)

    @staticmethod
    def _with_zmq_com(frame: Frame, client_url: str) -> bytes:
        """The request text with ``"zmq_com"`` inserted as its first member (upstream's
        byte layout: ``{"zmq_com":"<url>",`` then the original text after ``{``)."""
        if "zmq_com" in frame.value:
            body = {"zmq_com": client_url}
            body.update((k, v) for k, v in frame.value.items() if k != "zmq_com")
            return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return b'{"zmq_com":"' + client_url.encode("utf-8") + b'",' + frame.raw[1:]

    # -- unit RPC -----------------------------------------------------------------------------

    def _client(self, unit: str) -> AsyncRpcClient:
        client = self._clients.get(unit)
        if client is None:
            client = AsyncRpcClient(
                unit, timeout=self.config.rpc_timeout, runtime_dir=self.config.runtime_dir
            )
            self._clients[unit] = client
            while len(self._clients) > MAX_RPC_CLIENTS:
                self._clients.popitem(last=False)[1].close()
        else:
            self._clients.move_to_end(unit)
        return client

    async def _call_unit(
        self,
        link: Link,
        unit: str,
        action: str,
        frame: Frame,
        request_id: str,
        work_id: str,
    ) -> None:
        problem = link.open_inbox()
        if problem is not None:
            link.send(self._error(ErrorCode.UNIT_CALL, request_id, work_id,
                                  f"unit call false: {problem}"))  # fmt: skip
            return
        # Opened before the call: the unit may PUSH its answer before its RPC reply lands.
        timeout = self.config.setup_timeout if action == "setup" else None
        pending = link.pending.add(request_id, work_id, timeout=timeout)
        if action == "setup":
            silent = _setup_enoutput(frame.value) is False
            pending.on_done = lambda answer: self._note_setup(link, answer, silent)
        try:
            reply = await self._client(unit).call(action, set_param(link.client_url, frame.raw))
        except CommError as exc:
            problem = str(exc)
        except Exception as exc:  # e.g. a socket error: still one answer for the client
            log.exception("unit call %s %s", work_id, action)
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if not is_not_action(reply):
                return
            problem = f"unit {unit!r} has no action {action!r}"
        if not link.pending.cancel(pending):
            return  # the unit's answer got through after all
        log.info("unit call %s %s failed: %s", work_id, action, problem)
        link.send(
            self._error(ErrorCode.UNIT_CALL, request_id, work_id, f"unit call false: {problem}")
        )

    def _note_setup(self, link: Link, answer: Any, silent: bool) -> None:
        """A setup was answered: if it succeeded, its task belongs to ``link`` (it ends when
        the connection closes) and, set up with enoutput false, expects no answers."""
        error = getattr(answer, "error", None)
        if type(error) is dict and error.get("code", 0) != 0:
            return
        task = self._registry.get(getattr(answer, "work_id", None))
        if task is not None:
            link.tasks.add(task.work_id)
            if silent:
                task.enoutput = False

    def _error(self, code: ErrorCode, request_id: str = NO_REQUEST_ID, work_id: str = SYS_WORK_ID,
               message: str | None = None) -> bytes:  # fmt: skip
        return encode_error(code, request_id, work_id, message, created=int(self._clock()))

    def _response(self, request_id: str, work_id: str, object_: str, data: Any) -> bytes:
        return encode_response(request_id, work_id, object_, data, created=int(self._clock()))

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    # -- sys ----------------------------------------------------------------------------------

    async def _sys_unit_call(
        self, link: Link, value: dict[str, Any], request_id: str, work_id: str
    ) -> None:
        """StackFlow's ``sys.unit_call``: object ``<unit>.<action>``, data sent as is; the
        RPC reply comes back as data (parsed if it is JSON)."""
        object_ = value.get("object")
        data = value.get("data", "")
        unit, _, action = object_.partition(".") if type(object_) is str else ("", "", "")
        if not UNIT_NAME.match(unit) or not action:
            link.send(
                self._error(
                    ErrorCode.JSON_FORMAT,
                    request_id,
                    work_id,
                    "json format error: unit_call needs object '<unit>.<action>'",
                )
            )
            return
        if type(data) is not str:
            data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        try:
            reply = await self._client(unit).call(action, data)
        except CommError as exc:
            link.send(
                self._error(ErrorCode.UNIT_CALL, request_id, work_id, f"unit call false: {exc}")
            )
            return
        text = reply.decode("utf-8", errors="replace")
        try:
            answer: Any = json.loads(text)
        except ValueError:
            answer = text
        link.send(self._response(request_id, work_id, object_, answer))
