"""The echo unit: the upstream test node (``node/test``) in Python.

Each inference is answered with the input text, then ``hello``, then the empty final
piece (``finish`` true) when the task's response format is a stream; otherwise once, with
the whole answer (input text followed by ``hello``) as a string. ``pause`` makes a task
refuse inference (-14) until ``work``. Chaining comes from the controller library: a task
whose ``input`` lists another task's work id echoes that task's (reassembled) output.
"""

from __future__ import annotations

from typing import Any

from edgellm.protocol.errors import ErrorCode
from edgellm.unit import Task, Unit, UnitError

SECOND_PIECE = "hello"


class EchoUnit(Unit):
    """Echo: ``text`` -> ``text``, ``hello``, end of stream."""

    def inference(self, task: Task, text: str) -> None:
        if task.config.stream:
            task.piece(text)
            task.piece(SECOND_PIECE)
            task.finish()
        else:
            task.send(task.config.response_format, text + SECOND_PIECE)

    def pause_task(self, task: Task, data: Any) -> None:
        task.paused = True

    def work_task(self, task: Task, data: Any) -> None:
        if not task.paused:
            raise UnitError(ErrorCode.ALREADY_WORKING)
        task.paused = False
