"""The controller library: write a unit (StackFlow node) by subclassing :class:`Unit`.

See :mod:`edgellm.unit.base` for the threads, the hooks and the path of a request,
:mod:`edgellm.unit.task` for the envelope and ``enoutput`` rules, and
:mod:`edgellm.comm.sys_client` for the unit manager's ``sys`` service (``SysClient`` and
its errors are exported here too).
"""

from edgellm.comm.sys_client import Registration, SysClient, SysError, SysUnavailable
from edgellm.unit.base import ACTIONS, Unit
from edgellm.unit.channel import TaskChannel
from edgellm.unit.config import WORK_ID_RE, TaskConfig, UnitConfig, UnitError
from edgellm.unit.stream import StreamAssembler, StreamIndexError
from edgellm.unit.task import NONE, Task

__all__ = [
    "ACTIONS",
    "NONE",
    "Registration",
    "StreamAssembler",
    "StreamIndexError",
    "SysClient",
    "SysError",
    "SysUnavailable",
    "Task",
    "TaskChannel",
    "TaskConfig",
    "Unit",
    "UnitConfig",
    "UnitError",
    "WORK_ID_RE",
]
