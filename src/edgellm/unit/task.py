"""One task of a unit: its work id, configuration, current client and output helpers.

A task answers on its :class:`~edgellm.unit.channel.TaskChannel`. The envelope and the
``enoutput`` rule are upstream's (``llm_channel_obj::send``): every output is published on
the task's output url (for downstream tasks) and pushed to the client only when the task
was set up with ``enoutput`` true. Replies to the client's own requests (setup, errors)
are pushed only.

The "current client" (``push_url``, ``request_id``) is retargeted by each client request
that reaches the task, as upstream does with ``zmq_com``; outputs carry that request's id.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from edgellm.protocol.envelope import encode, make_response
from edgellm.protocol.sys_rpc import Registration
from edgellm.unit.channel import TaskChannel
from edgellm.unit.config import TaskConfig, UnitError
from edgellm.unit.stream import StreamAssembler

NONE = "None"
"""Upstream's placeholder for an absent object or data."""


class Task:
    """State of one task. Output methods are thread-safe (sends from other threads are
    handed to the task's worker); request state is updated on the worker. ``clock`` gives
    the ``created`` of its envelopes (unix seconds)."""

    def __init__(self, registration: Registration, config: TaskConfig, channel: TaskChannel,
                 *, clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.registration = registration
        self.work_id = registration.work_id
        self.number = registration.number
        self.config = config
        self.channel = channel
        self.push_url = ""
        self.request_id = ""
        self.paused = False
        self.state: dict[str, Any] = {}
        """Free for the unit's own per-task objects (a model, a session...)."""
        self._clock = clock
        self._index = 0
        self._assemblers: dict[str, StreamAssembler] = {}

    # -- outputs -----------------------------------------------------------------------

    def envelope(self, object_: str, data: Any, code: int = 0, message: str = "", *,
                 request_id: str | None = None, work_id: str | None = None) -> bytes:  # fmt: skip
        """One encoded envelope of this task, stamped by its clock (``request_id`` and
        ``work_id`` default to the current client's request and the task's): for units
        that emit or push on :attr:`channel` themselves."""
        return encode(make_response(
            self.request_id if request_id is None else request_id,
            self.work_id if work_id is None else work_id,
            object_, data, code, message, created=int(self._clock()),
        ))  # fmt: skip

    def send(self, object_: str, data: Any, code: int = 0, message: str = "") -> None:
        """Publish one envelope; push it to the client too if ``enoutput``."""
        payload = self.envelope(object_, data, code, message)
        self.channel.emit(payload, self.push_url if self.config.enoutput else None)

    def piece(self, delta: str) -> None:
        """One streamed output piece ``{"delta", "finish": false, "index"}``."""
        index = self._index
        self._index = index + 1
        self.send(self.config.response_format, {"delta": delta, "finish": False, "index": index})

    def finish(self) -> None:
        """The last streamed piece (empty delta, ``finish`` true); indices restart at 0."""
        index = self._index
        self._index = 0
        self.send(self.config.response_format, {"delta": "", "finish": True, "index": index})

    def reply(
        self,
        object_: str = NONE,
        data: Any = NONE,
        code: int = 0,
        message: str = "",
        *,
        request_id: str | None = None,
        work_id: str | None = None,
        to: str | None = None,
    ) -> None:
        """Push one envelope to a client only (default: the current one)."""
        url = self.push_url if to is None else to
        if url:
            payload = self.envelope(object_, data, code, message, request_id=request_id,
                                    work_id=work_id)  # fmt: skip
            self.channel.push(url, payload)

    def reply_error(self, error: UnitError, **kwargs: Any) -> None:
        """The error envelope of ``error`` (object and data ``"None"``) to the client."""
        self.reply(NONE, NONE, int(error.code), error.message, **kwargs)

    # -- input ---------------------------------------------------------------------------

    def assembler(self, source: str) -> StreamAssembler:
        """The stream buffer of one input (``""`` = the client's own inference)."""
        assembler = self._assemblers.get(source)
        if assembler is None:
            assembler = self._assemblers[source] = StreamAssembler()
        return assembler

    def retarget(self, push_url: str, request_id: str) -> None:
        """*Worker only.* Make ``push_url``/``request_id`` the current client."""
        if push_url:
            self.push_url = push_url
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"<Task {self.work_id} {self.config.response_format}>"
