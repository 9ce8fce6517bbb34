"""Pods announced by units through the unit manager's key/value store (the ``sys`` RPC).

Key scheme (the sys service only offers ``sql_select`` / ``sql_set`` / ``sql_unset`` of one
key, no listing, so an index key lists the announcers):

- ``kvevents.<work_id>`` -> JSON ``{"ip", "model", "pub_port", "router_port",
  "lora_id"?, "pod_key"?, "dp_size"?}``: the KV event endpoint of unit ``work_id`` (e.g. ``llm.3``);
  ``pod_key`` defaults to ``unit/<work_id>``;
- ``kvevents.index`` -> JSON array of the work ids that announce.

A unit calls :func:`announce` after it starts publishing and :func:`withdraw` before it
releases its work id. Both update the index by read-modify-write and read it back, retrying
if a concurrent announcer overwrote it. An announcement counts only while the unit is
registered, i.e. while the unit manager still holds its ``<work_id>.out_port`` key
(``register_unit`` sets it, ``release_unit`` erases it) or, for a whole unit announcing under
its own name (the llm unit's engine, pod ``<box>/<unit>``), its ``mode.<unit>`` key (the
manager drops it once the unit is gone): a unit that crashed without withdrawing disappears
when the manager releases it.

:class:`UnitRegistryPodProvider` polls the sys service every ``poll_interval`` seconds and
applies the difference to its listeners; an unreachable service is logged and retried, the
last known set stays. Everything goes through :class:`edgellm.comm.sys_client.SysClient`.
"""

from __future__ import annotations

import json
import logging
import threading

from edgellm.comm.errors import CommError, SysError
from edgellm.comm.sys_client import SysClient
from edgellm.comm.urls import DEFAULT_RUNTIME_DIR
from edgellm.discovery.pod import DEFAULT_PUB_PORT, DEFAULT_ROUTER_PORT, Pod
from edgellm.discovery.provider import StaticPodProvider
from edgellm.protocol import sys_rpc

log = logging.getLogger(__name__)

INDEX_KEY = sys_rpc.KVEVENTS_INDEX_KEY
KEY_PREFIX = sys_rpc.KVEVENTS_KEY_PREFIX


def entry_key(work_id: str) -> str:
    return f"{KEY_PREFIX}{work_id}"


def _sql_set(client: SysClient, key: str, value: str) -> None:
    if not client.sql_set(key, value):
        raise SysError(f"sql_set {key!r} refused")


def _read_index(client: SysClient) -> list[str]:
    raw = client.sql_select(INDEX_KEY)
    if not raw:
        return []
    try:
        ids = json.loads(raw)
    except ValueError:
        log.warning("%s holds invalid JSON; treating it as empty", INDEX_KEY)
        return []
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def _update_index(client: SysClient, work_id: str, present: bool, attempts: int = 10) -> None:
    for _ in range(attempts):
        ids = _read_index(client)
        if (work_id in ids) == present:
            return
        ids = [i for i in ids if i != work_id] + ([work_id] if present else [])
        _sql_set(client, INDEX_KEY, json.dumps(ids))
        if (work_id in _read_index(client)) == present:
            return
    raise SysError(f"could not update {INDEX_KEY} for {work_id!r} (concurrent writers?)")


def announce(client: SysClient, work_id: str, *, ip: str, model: str,
             pub_port: int = DEFAULT_PUB_PORT, router_port: int = DEFAULT_ROUTER_PORT,
             lora_id: int = -1, pod_key: str | None = None, dp_size: int = 1) -> None:  # fmt: skip
    """Publish unit ``work_id``'s KV event endpoint; raises ``SysError`` on failure."""
    entry = {"ip": ip, "model": model, "pub_port": pub_port, "router_port": router_port,
             "lora_id": lora_id, "pod_key": pod_key or f"unit/{work_id}"}  # fmt: skip
    if dp_size != 1:
        entry["dp_size"] = dp_size
    Pod(entry["pod_key"], ip, model, lora_id, pub_port, router_port, dp_size=dp_size)
    _sql_set(client, entry_key(work_id), json.dumps(entry))
    _update_index(client, work_id, True)


def withdraw(client: SysClient, work_id: str) -> None:
    """Remove unit ``work_id``'s announcement; raises ``SysError`` on failure."""
    _update_index(client, work_id, False)
    client.sql_unset(entry_key(work_id))


def _liveness_key(work_id: str) -> str:
    """The key that exists while the announcer is registered: a task's ``<work_id>.out_port``,
    or for a whole unit (an id without a dot, the llm unit's engine) its ``mode.<unit>``."""
    return sys_rpc.out_port_key(work_id) if "." in work_id else sys_rpc.MODE_KEY_PREFIX + work_id


def _pod_from_entry(work_id: str, raw: str) -> Pod | None:
    try:
        entry = json.loads(raw)
        return Pod(
            pod_key=str(entry.get("pod_key") or f"unit/{work_id}"),
            ip=entry["ip"],
            model=entry["model"],
            lora_id=entry.get("lora_id", -1),
            pub_port=entry.get("pub_port", DEFAULT_PUB_PORT),
            router_port=entry.get("router_port", DEFAULT_ROUTER_PORT),
            labels={"edgellm.io/work-id": work_id},
            dp_size=entry.get("dp_size", 1),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("announcement of %s is invalid: %s", work_id, exc)
        return None


class UnitRegistryPodProvider(StaticPodProvider):
    """Pods announced in the unit manager's key/value store (see the module docstring)."""

    def __init__(self, *, runtime_dir: str = DEFAULT_RUNTIME_DIR, service: str = "sys",
                 poll_interval: float = 2.0, rpc_timeout: float = 3.0,
                 require_registered: bool = True):  # fmt: skip
        super().__init__()
        if poll_interval <= 0:
            raise ValueError("poll_interval must be > 0")
        self.poll_interval = poll_interval
        self.require_registered = require_registered
        self._client = SysClient(runtime_dir=runtime_dir, call_timeout=rpc_timeout,
                                 retry_deadline=0, service=service)  # fmt: skip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0

    def start(self) -> "UnitRegistryPodProvider":
        """Read the registry once (failure is logged, not raised), then poll it."""
        if self._thread is None:
            self.refresh()
            self._thread = threading.Thread(target=self._poll, name="unit-registry", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self._client.call_timeout * 4 + 5)
        self._client.close()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.refresh()

    def refresh(self) -> bool:
        """Read the registry and apply the difference; False if the service failed."""
        try:
            pods = self._read()
        except CommError as exc:
            self.failures += 1
            log.warning("unit registry unavailable, keeping %d pods: %s", len(self.pods()), exc)
            return False
        if not self._stop.is_set():
            self.replace(pods)
        return True

    def _read(self) -> list[Pod]:
        pods: dict[str, Pod] = {}
        for work_id in _read_index(self._client):
            raw = self._client.sql_select(entry_key(work_id))
            if not raw:
                continue
            if self.require_registered and not self._client.sql_select(_liveness_key(work_id)):
                continue
            pod = _pod_from_entry(work_id, raw)
            if pod is not None and pod.pod_key not in pods:
                pods[pod.pod_key] = pod
        return list(pods.values())


__all__ = ["UnitRegistryPodProvider", "announce", "withdraw", "INDEX_KEY", "entry_key"]
