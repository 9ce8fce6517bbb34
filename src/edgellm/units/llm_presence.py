"""The llm unit's presence at its unit manager, kept while the unit runs.

- the box's name (the manager's ``sys.box_name``; the host name when the manager does not
  say), which makes the engine's pod key ``<box>/<unit>``;
- two ports of the manager's pool (``alloc_port``) for the KV event publisher and its replay
  socket, so units on one host never collide; a manager without ``alloc_port`` (the C++
  original) leaves the choice to the OS;
- its mode info under ``mode.<unit>`` (``lsmode``) and its KV event endpoint under
  ``kvevents.<unit>`` (``kv-events --unit-registry``).

A manager that restarts forgets all of that: a heartbeat thread notices (``mode.<unit>`` is
gone), re-claims the same ports by number and publishes the entries again, at once when the
unit's link to the manager reports it up (:meth:`UnitPresence.refresh`), else within
``HEARTBEAT_SECONDS``. :meth:`withdraw`
removes everything when the unit stops.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Any, Callable

from edgellm.comm.errors import CommError
from edgellm.comm.rpc_thread import probe
from edgellm.discovery.unit_registry import announce, withdraw
from edgellm.protocol import sys_rpc
from edgellm.unit.sys_client import SysClient, SysError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0


class UnitPresence:
    """See the module docstring. ``new_client()`` makes a sys client for the calling thread."""

    def __init__(self, unit: str, new_client: Callable[[], SysClient]):
        self.unit = unit
        self._new_client = new_client
        self.ports: list[int] = []
        self._modes: list[dict[str, Any]] = []
        self._endpoint: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # a check is due now (set by refresh and withdraw)
        self._thread: threading.Thread | None = None

    @property
    def mode_key(self) -> str:
        return sys_rpc.MODE_KEY_PREFIX + self.unit

    def box_name(self) -> str:
        with self._new_client() as client:
            try:
                name = client.sql_select(sys_rpc.BOX_NAME_KEY, deadline=2.0)
            except SysError as exc:
                log.warning("no box name from the unit manager (%s); using the host name", exc)
                name = ""
        return name or socket.gethostname() or "localhost"

    def lease_ports(self, count: int) -> list[int]:
        """``count`` ports of the manager's pool; [] when it does not lease ports."""
        ports: list[int] = []
        with self._new_client() as client:
            for _ in range(count):
                try:
                    port = client.alloc_port(self.unit, deadline=3.0)
                except SysError as exc:
                    log.warning("cannot lease a port (%s); the OS picks the KV event ports", exc)
                    break
                if port is None:
                    log.warning("the unit manager leases no port (a C++ one, or its pool is "
                                "empty); the OS picks the KV event ports")  # fmt: skip
                    break
                ports.append(port)
            if len(ports) < count:
                for port in ports:
                    self._release(client, port)
                return []
        self.ports = ports
        return ports

    def publish(self, modes: list[dict[str, Any]], endpoint: dict[str, Any] | None) -> None:
        """Publish the mode infos and the KV event endpoint (``announce``'s keywords), then
        keep them published (heartbeat)."""
        self._modes = modes
        self._endpoint = endpoint
        with self._new_client() as client:
            try:
                self._publish(client)
            except (SysError, CommError) as exc:
                log.warning("cannot publish %s yet (%s); retrying", self.mode_key, exc)
        self._thread = threading.Thread(target=self._heartbeat, name=f"presence:{self.unit}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _publish(self, client: SysClient) -> None:
        if not client.sql_set(self.mode_key, json.dumps(self._modes), deadline=3.0):
            raise SysError(f"the unit manager refused {self.mode_key}")
        if self._endpoint is not None:
            announce(client, self.unit, **self._endpoint)

    def refresh(self) -> None:
        """Check now rather than at the next heartbeat (a unit manager just came up)."""
        self._wake.set()

    def _heartbeat(self) -> None:
        with self._new_client() as client:
            while True:
                self._wake.wait(HEARTBEAT_SECONDS)
                self._wake.clear()
                if self._stop.is_set():
                    return
                try:
                    if client.sql_select(self.mode_key, deadline=HEARTBEAT_SECONDS):
                        continue
                    log.info("unit manager lost %s (restarted?): publishing again", self.mode_key)
                    for port in self.ports:  # the same numbers: the sockets stay bound
                        if client.alloc_port(self.unit, port, deadline=2.0) is None:
                            log.warning("port %d is leased to someone else now", port)
                    self._publish(client)
                except (SysError, CommError) as exc:
                    log.debug("heartbeat: %s", exc)

    def withdraw(self) -> None:
        """Stop the heartbeat; remove the entries and give the ports back (best effort)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(HEARTBEAT_SECONDS * 3)
        with self._new_client() as client:
            if probe(client.url, timeout=0.5) is None:  # gone (or dying): nothing to withdraw
                log.info("unit manager gone: %s not withdrawn", self.unit)
                return
            try:
                if self._endpoint is not None:
                    withdraw(client, self.unit)
                client.sql_unset(self.mode_key, deadline=1.0)
                for port in self.ports:
                    self._release(client, port)
            except (SysError, CommError) as exc:
                log.warning("could not withdraw %s from the unit manager: %s", self.unit, exc)

    def release_ports(self) -> None:
        """Give the leased ports back now (the unit could not bind them)."""
        with self._new_client() as client:
            for port in self.ports:
                self._release(client, port)
        self.ports = []

    def _release(self, client: SysClient, port: int) -> None:
        try:
            client.release_port(self.unit, port, deadline=1.0)
        except SysError as exc:
            log.debug("release of port %d: %s", port, exc)
