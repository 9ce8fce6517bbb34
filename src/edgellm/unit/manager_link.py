"""A unit's link to its unit manager, kept across the manager's restarts.

The unit keeps a connection to the manager's ``rpc.sys`` open (a DEALER that never sends;
the C++ original's REP takes it as well) and watches its events, on the control thread:

- connected (the unit started with its manager up, or a manager started or restarted under
  it): the unit registers under its name, ``unit.<name>`` in the manager's store (its pid,
  ``rpc.<name>`` url and actions; ``lsunit`` shows them), then ``on_up()`` runs: the llm unit
  publishes its models and KV event endpoint again at once;
- disconnected: the manager is gone. Nothing to do here: each task's own link to the manager
  closes as well, and the task ends (:mod:`edgellm.unit.channel`); the next manager is found
  within ``RECONNECT_MAX`` seconds of its start.

A registration that fails (the manager is slow, or a C++ one) is logged; the unit serves
anyway, as every unit did before registrations existed.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from edgellm.comm.endpoints import Dealer, LinkEvent
from edgellm.comm.errors import EndpointError
from edgellm.comm.loop import SocketThread
from edgellm.comm.sys_client import SysClient, SysError
from edgellm.protocol.sys_rpc import UNIT_KEY_PREFIX

log = logging.getLogger(__name__)

RECONNECT_MAX = 0.25
"""Longest wait between two attempts to reach a manager that is not up (seconds)."""

REGISTER_DEADLINE = 2.0


class ManagerLink:
    """The link of unit ``unit`` to the manager ``sys_client`` calls; lives on ``thread``
    (the unit's control thread), which owns its endpoint."""

    def __init__(self, thread: SocketThread, sys_client: SysClient, unit: str,
                 registration: dict[str, Any], on_up: Callable[[], None]) -> None:  # fmt: skip
        self._thread = thread
        self._sys = sys_client
        self.unit = unit
        self._registration = json.dumps(registration, separators=(",", ":"))
        self._on_up = on_up
        self.up = False
        self.registrations = 0
        """How many times the unit registered (once per manager it met)."""

    @property
    def key(self) -> str:
        return UNIT_KEY_PREFIX + self.unit

    def open(self) -> None:
        """*Thread only.* Connect and watch (the first manager is met like any later one).
        A url that cannot be connected is logged: the unit then does without (what else
        it cannot do with that url fails on its own, saying why)."""
        try:
            link = self._thread.open(Dealer, self._sys.url, reconnect_max=RECONNECT_MAX,
                                     monitor=LinkEvent.CONNECTED | LinkEvent.DISCONNECTED)  # fmt: skip
        except EndpointError as exc:
            log.error("unit %s: no link to the unit manager: %s", self.unit, exc)
            return
        self._monitor = link.link_monitor
        self._thread.add_reader(self._monitor, self._on_events)  # type: ignore[arg-type]

    def _on_events(self) -> None:
        for event in self._monitor.events():  # type: ignore[union-attr]
            if event == LinkEvent.CONNECTED and not self.up:
                self.up = True
                self._register()
            elif event == LinkEvent.DISCONNECTED and self.up:
                self.up = False
                log.warning("unit %s: the unit manager went away; waiting for the next one",
                            self.unit)  # fmt: skip

    def _register(self) -> None:
        try:
            if not self._sys.sql_set(self.key, self._registration, deadline=REGISTER_DEADLINE):
                raise SysError(f"the manager refused {self.key}")
        except SysError as exc:
            log.warning("unit %s: not registered at the unit manager: %s", self.unit, exc)
        else:
            self.registrations += 1
            log.info("unit %s registered at the unit manager", self.unit)
        try:
            self._on_up()
        except Exception:  # the unit's hook: logged, the link lives on
            log.exception("unit %s: on_up failed", self.unit)


def withdraw(sys_client: SysClient, unit: str, deadline: float = 0.5) -> None:
    """Remove ``unit``'s registration (a unit that stops); best effort."""
    try:
        sys_client.sql_unset(UNIT_KEY_PREFIX + unit, deadline=deadline)
    except SysError as exc:
        log.debug("unit %s: registration not withdrawn: %s", unit, exc)


__all__ = ["ManagerLink", "RECONNECT_MAX", "withdraw"]
