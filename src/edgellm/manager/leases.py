"""What a unit process holds beyond its tasks, and its release when the unit is gone.

A unit registers under its name (``unit.<unit>``, :mod:`edgellm.unit.manager_link`), may
lease ports of the manager's pool for listeners of its own (the llm unit's KV event
publisher and replay socket: several units on one host then never collide) and publish
entries in the key/value store: ``mode.<unit>`` (its models, listed by ``lsmode``) and
``kvevents.<unit>`` (its KV event endpoint, read by ``kv-events --unit-registry``).

A unit releases them itself when it stops. If it dies instead, its ``rpc.<unit>`` service
stops answering (its ipc file may stay behind after a SIGKILL: the watch probes the service
with ``list_action``, it does not trust the file); once it has been silent for
``orphan_timeout`` the manager frees the unit's
ports and removes its entries (and its name from ``kvevents.index``), so a crashed unit's
models are not listed and its ports come back. A unit that restarts under the same name
within that time keeps them (it re-claims its ports by number).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from edgellm.comm.errors import CommError
from edgellm.comm.rpc_asyncio import AsyncRpcClient
from edgellm.comm.urls import endpoint_exists, rpc_url
from edgellm.protocol import sys_rpc
from edgellm.protocol.rpc import LIST_ACTION
from edgellm.manager.allocator import PoolExhausted, PortPool
from edgellm.manager.store import KeyValueStore

log = logging.getLogger(__name__)

MODE_PREFIX = sys_rpc.MODE_KEY_PREFIX
UNIT_PREFIX = sys_rpc.UNIT_KEY_PREFIX
KVEVENTS_PREFIX = sys_rpc.KVEVENTS_KEY_PREFIX
KVEVENTS_INDEX = sys_rpc.KVEVENTS_INDEX_KEY
PROBE_TIMEOUT = 0.5


class LeaseError(Exception):
    """A lease that cannot be granted (pool exhausted, port taken)."""


class UnitLeases:
    """Ports leased by unit name, and the watch that frees a dead unit's (event loop thread)."""

    def __init__(self, ports: PortPool, store: KeyValueStore, runtime_dir: str,
                 orphan_timeout: float) -> None:  # fmt: skip
        self._ports = ports
        self._store = store
        self._runtime_dir = runtime_dir
        self._orphan_timeout = orphan_timeout
        self._owner_of: dict[int, str] = {}
        self._missing_since: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    def lease(self, owner: str, port: int | None = None) -> int:
        """A port for ``owner``: the lowest free one, or ``port`` itself (a unit re-claiming
        what it holds after a manager restart; granted again if already its own)."""
        if port is None:
            try:
                port = self._ports.take()
            except PoolExhausted as exc:
                raise LeaseError(str(exc)) from None
        elif self._owner_of.get(port) == owner:
            return port
        elif not self._ports.take_specific(port):
            raise LeaseError(f"port {port} is not free")
        self._owner_of[port] = owner
        log.info("port %d leased to unit %s", port, owner)
        return port

    def release(self, port: int, owner: str | None = None) -> bool:
        """Free a leased port (only ``owner``'s, when given); False if it was not leased."""
        holder = self._owner_of.get(port)
        if holder is None or (owner is not None and holder != owner):
            return False
        del self._owner_of[port]
        self._ports.give_back(port)
        return True

    def owners(self) -> set[str]:
        """Units holding something here: leased ports, a ``mode.<unit>`` entry, or a
        registration ``unit.<unit>``."""
        owners = set(self._owner_of.values())
        for key in self._store:
            for prefix in (MODE_PREFIX, UNIT_PREFIX):
                if key.startswith(prefix) and "." not in key[len(prefix):]:
                    owners.add(key[len(prefix):])
        return owners

    # -- the watch ---------------------------------------------------------------------------

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Check the owners every ``orphan_timeout / 3`` seconds (at most 5) until :meth:`close`."""
        interval = max(0.05, min(5.0, self._orphan_timeout / 3))

        async def run() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.check()

        self._task = loop.create_task(run(), name="unit-leases")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def check(self) -> None:
        """Free what units silent for ``orphan_timeout`` held."""
        for owner in self.owners():
            alive = await self._answers(owner)
            now = time.monotonic()
            if alive:
                self._missing_since.pop(owner, None)
                continue
            since = self._missing_since.setdefault(owner, now)
            if now - since >= self._orphan_timeout:
                self.drop(owner)

    async def _answers(self, owner: str) -> bool:
        url = rpc_url(owner, self._runtime_dir)
        if not endpoint_exists(url):
            return False
        client = AsyncRpcClient(url, timeout=PROBE_TIMEOUT)
        try:
            await client.call(LIST_ACTION)
            return True
        except CommError:
            return False
        finally:
            client.close()

    def drop(self, owner: str) -> None:
        self._missing_since.pop(owner, None)
        for port in [p for p, o in self._owner_of.items() if o == owner]:
            self.release(port)
        self._store.unset(MODE_PREFIX + owner)
        self._store.unset(UNIT_PREFIX + owner)
        self._store.unset(KVEVENTS_PREFIX + owner)
        raw = self._store.select(KVEVENTS_INDEX)
        try:
            ids = json.loads(raw) if raw else []
        except ValueError:
            ids = []
        if isinstance(ids, list) and owner in ids:
            self._store.set(KVEVENTS_INDEX, json.dumps([i for i in ids if i != owner]))
        log.warning("unit %s is gone: its ports and announcements were released", owner)


def unit_modes(store: KeyValueStore) -> list[object]:
    """The mode infos units published (``mode.<unit>``: a JSON array each), by unit name."""
    modes: list[object] = []
    for key in sorted(store):
        if not key.startswith(MODE_PREFIX) or "." in key[len(MODE_PREFIX):]:
            continue
        try:
            entries = json.loads(store.select(key))
        except ValueError:
            log.warning("lsmode: %s is not JSON; skipped", key)
            continue
        if isinstance(entries, list):
            modes.extend(e for e in entries if isinstance(e, dict))
        elif isinstance(entries, dict):
            modes.append(entries)
    return modes


def unit_registrations(store: KeyValueStore) -> dict[str, Any]:
    """What units registered (``unit.<unit>``: a JSON object each), by unit name."""
    units: dict[str, Any] = {}
    for key in store:
        name = key[len(UNIT_PREFIX):]
        if not key.startswith(UNIT_PREFIX) or not name or "." in name:
            continue
        try:
            units[name] = json.loads(store.select(key))
        except ValueError:
            units[name] = {}
    return units
