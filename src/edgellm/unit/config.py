"""Configuration of a unit process and of one task (the ``data`` of a ``setup``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from edgellm.comm.urls import DEFAULT_RUNTIME_DIR
from edgellm.protocol.errors import ErrorCode

WORK_ID_RE = re.compile(r"^(\w+)\.(\d+)$")
"""A task's work id, ``<unit>.<number>`` (upstream's ``(\\w+)\\.(\\d+)``)."""

_UNIT_NAME_RE = re.compile(r"^\w+$")


class UnitError(Exception):
    """A unit action failed; ``code`` is the error code the client receives."""

    def __init__(self, code: ErrorCode, detail: str = ""):
        super().__init__(detail or code.message)
        self.code = code
        self.detail = detail

    @property
    def message(self) -> str:
        return f"{self.code.message}: {self.detail}" if self.detail else self.code.message


@dataclass(frozen=True)
class UnitConfig:
    """Everything a unit process needs to know; validated on construction.

    - ``name``: the unit name; its RPC service is ``rpc.<name>`` and its tasks ``<name>.<n>``.
    - ``runtime_dir``: where ``rpc.*`` ipc sockets live (upstream ``/tmp``).
    - ``max_tasks``: tasks alive at once; one more ``setup`` gets error -21.
    - ``sys_call_timeout`` / ``sys_retry_deadline``: one sys RPC attempt / a whole call
      with retries while the unit manager is absent or restarting.
    - ``subscribe_timeout``: how long a setup waits for its input subscriptions to
      connect before answering (so the client's first inference is not lost).
    - ``stop_timeout``: how long stopping waits for a task's worker thread.
    """

    name: str = "llm"
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    max_tasks: int = 256
    sys_call_timeout: float = 3.0
    sys_retry_deadline: float = 10.0
    subscribe_timeout: float = 2.0
    stop_timeout: float = 2.0
    dir_mode: int = 0o700

    def __post_init__(self) -> None:
        if not _UNIT_NAME_RE.match(self.name):
            raise ValueError(f"unit name must be letters, digits or '_': {self.name!r}")
        if self.max_tasks < 1:
            raise ValueError("max_tasks must be at least 1")
        for key in ("sys_call_timeout", "sys_retry_deadline", "subscribe_timeout", "stop_timeout"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive")


@dataclass(frozen=True)
class TaskConfig:
    """The standard fields of a ``setup`` request's ``data`` (as the C++ ``parse_config``).

    ``model``, ``response_format`` (strings) and ``enoutput`` (bool) are required;
    ``input`` is a string or a list of strings. ``stream`` is true when the response
    format names a stream. ``extra`` keeps every other field for the unit's own use.
    """

    model: str
    response_format: str
    enoutput: bool
    inputs: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def stream(self) -> bool:
        return "stream" in self.response_format

    @property
    def upstream_inputs(self) -> tuple[str, ...]:
        """Inputs that name another task (``asr.3``): their output feeds this task."""
        return tuple(i for i in self.inputs if WORK_ID_RE.match(i))

    @classmethod
    def parse(cls, data: Any) -> "TaskConfig":
        """Validate setup data; raises :class:`UnitError` -2 (not an object) or -5
        (a required field missing or of the wrong type, upstream's "model loading failed")."""
        if not isinstance(data, dict):
            raise UnitError(ErrorCode.JSON_FORMAT, "setup data must be a JSON object")
        model = data.get("model")
        response_format = data.get("response_format")
        enoutput = data.get("enoutput")
        if not isinstance(model, str):
            raise UnitError(ErrorCode.MODEL_LOADING, "setup data needs 'model' (string)")
        if not isinstance(response_format, str):
            raise UnitError(ErrorCode.MODEL_LOADING, "setup data needs 'response_format' (string)")
        if not isinstance(enoutput, bool):
            raise UnitError(ErrorCode.MODEL_LOADING, "setup data needs 'enoutput' (boolean)")
        raw_input = data.get("input", [])
        if isinstance(raw_input, str):
            inputs: tuple[str, ...] = (raw_input,)
        elif isinstance(raw_input, list) and all(isinstance(i, str) for i in raw_input):
            inputs = tuple(raw_input)
        else:
            raise UnitError(ErrorCode.MODEL_LOADING, "'input' must be a string or list of strings")
        extra = {
            k: v
            for k, v in data.items()
            if k not in ("model", "response_format", "enoutput", "input")
        }
        return cls(model, response_format, enoutput, inputs, extra)

    def with_input(self, work_id: str) -> "TaskConfig":
        if work_id in self.inputs:
            return self
        return TaskConfig(self.model, self.response_format, self.enoutput,
                          (*self.inputs, work_id), self.extra)

    def without_input(self, work_id: str) -> "TaskConfig":
        return TaskConfig(self.model, self.response_format, self.enoutput,
                          tuple(i for i in self.inputs if i != work_id), self.extra)

    def info(self) -> dict[str, Any]:
        """The ``taskinfo`` body of the C++ nodes: model, response_format, enoutput, inputs."""
        return {
            "enoutput": self.enoutput,
            "inputs": list(self.inputs),
            "model": self.model,
            "response_format": self.response_format,
        }


__all__ = ["TaskConfig", "UnitConfig", "UnitError", "WORK_ID_RE"]
