"""The ``sys`` actions the unit manager answers itself (StackFlow's ``sys.*``, spec 1 §3.3).

======== ==================== ==============================================================
action   object               data / what it does
======== ==================== ==============================================================
ping     None                 None
version  sys.utf-8            ``v<version>``
lsmode   sys.lsmode           models: ``lsmod_dir`` files and the units' ``mode.<unit>``
hwinfo   sys.hwinfo           temperature, cpu_loadavg, mem, eth_info
cmminfo  sys.cmminfo          ``{"total", "used", "remain"}`` KiB of the memory models load
                              into (:func:`edgellm.manager.sysinfo.cmm_info`)
lstask   sys.lstask           live tasks
lsunit   sys.lsunit           live units (registered, serving ``rpc.<unit>``, or with tasks)
reset    None                 ends every task: releases their work ids and ports (their units
                              see their links close and end them); message says how many
reboot   None                 refused (-10) unless the operator allowed it (``allow_reboot``);
                              then answered, and ``reboot_command`` runs 0.2 s later
======== ==================== ==============================================================

``unit_call`` is the dispatcher's (it calls a unit); anything else is -3.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from edgellm import __version__
from edgellm.manager import sysinfo
from edgellm.manager.config import ManagerConfig
from edgellm.manager.leases import unit_modes, unit_registrations
from edgellm.manager.store import KeyValueStore
from edgellm.manager.sysinfo import HwInfo
from edgellm.manager.units import UnitRegistry
from edgellm.protocol.envelope import SYS_WORK_ID, encode_error, encode_response
from edgellm.protocol.errors import ErrorCode

log = logging.getLogger(__name__)

REBOOT_REFUSED = (
    "reboot is not enabled on this unit manager (its operator may allow it: "
    "--allow-reboot with --reboot-command CMD)"
)


class SysActions:
    """Answers of the actions above. ``reboot()`` runs the operator's reboot command (it is
    only called when ``config.allow_reboot``); ``clock`` gives ``created``."""

    def __init__(self, config: ManagerConfig, registry: UnitRegistry, store: KeyValueStore,
                 hwinfo: HwInfo, clock: Callable[[], float],
                 reboot: Callable[[], None]) -> None:  # fmt: skip
        self.config = config
        self._registry = registry
        self._store = store
        self._hwinfo = hwinfo
        self._clock = clock
        self._reboot = reboot
        self._actions: dict[str, Callable[[str, str], bytes]] = {
            "ping": lambda rid, wid: self._response(rid, wid, "None", "None"),
            "version": lambda rid, wid: self._response(rid, wid, "sys.utf-8", f"v{__version__}"),
            "lsmode": self._lsmode,
            "hwinfo": lambda rid, wid: self._response(rid, SYS_WORK_ID, "sys.hwinfo",
                                                      self._hwinfo.sample()),  # fmt: skip
            "cmminfo": lambda rid, wid: self._response(rid, SYS_WORK_ID, "sys.cmminfo",
                                                       sysinfo.cmm_info()),  # fmt: skip
            "lstask": lambda rid, wid: self._response(
                rid, wid, "sys.lstask", [task.describe() for task in self._registry]),
            "lsunit": self._lsunit,
            "reset": self._reset,
            "reboot": self._reboot_action,
        }

    def answer(self, action: str, request_id: str, work_id: str) -> bytes:
        """The encoded answer to ``action`` (-3 for one that is not a sys action)."""
        handler = self._actions.get(action)
        if handler is None:
            return encode_error(ErrorCode.ACTION_MATCH, request_id, work_id,
                                created=int(self._clock()))  # fmt: skip
        return handler(request_id, work_id)

    def _response(self, request_id: str, work_id: str, object_: str, data: Any,
                  message: str = "") -> bytes:  # fmt: skip
        return encode_response(request_id, work_id, object_, data, 0, message,
                               created=int(self._clock()))  # fmt: skip

    def _lsmode(self, request_id: str, work_id: str) -> bytes:
        models = sysinfo.list_models(self.config.lsmod_dir) + unit_modes(self._store)
        return self._response(request_id, work_id, "sys.lsmode", models)

    def _lsunit(self, request_id: str, work_id: str) -> bytes:
        units = sysinfo.list_units(self.config.runtime_dir, self._registry,
                                   unit_registrations(self._store))  # fmt: skip
        return self._response(request_id, work_id, "sys.lsunit", units)

    def _reset(self, request_id: str, work_id: str) -> bytes:
        work_ids = [task.work_id for task in self._registry]
        for task_id in work_ids:
            self._registry.release(task_id)
        log.warning("reset: %d task(s) ended", len(work_ids))
        return self._response(request_id, work_id, "None", "None",
                              f"reset: {len(work_ids)} task(s) ended")  # fmt: skip

    def _reboot_action(self, request_id: str, work_id: str) -> bytes:
        if not self.config.allow_reboot:
            return encode_error(ErrorCode.MODEL_INIT, request_id, work_id, REBOOT_REFUSED,
                                created=int(self._clock()))  # fmt: skip
        log.warning("reboot asked for: running %r", self.config.reboot_command)
        self._reboot()
        return self._response(request_id, work_id, "None", "None", "rebooting ...")


__all__ = ["REBOOT_REFUSED", "SysActions"]
