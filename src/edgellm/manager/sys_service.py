"""The ``sys`` RPC service units call (spec 1 §3.2), served at ``rpc.sys``.

The actions and their bytes are :mod:`edgellm.protocol.sys_rpc`'s (byte-exact with the C++
original for upstream's five). ``alloc_port`` / ``release_port`` are ours
(:mod:`edgellm.manager.leases`): units that listen on ports of their own (the llm unit's KV
event publisher) take them from the manager's pool. Handlers run inline on the manager's
event loop (they are quick: a dict update or one ``bind``).
"""

from __future__ import annotations

import logging

from edgellm.comm.rpc import RpcDispatcher
from edgellm.manager.leases import LeaseError, UnitLeases
from edgellm.manager.store import KeyValueStore
from edgellm.manager.units import UNIT_NAME, RegistrationError, UnitRegistry
from edgellm.protocol import sys_rpc
from edgellm.protocol.sys_rpc import FALSE, SUCCESS, text

log = logging.getLogger(__name__)


class SysService:
    """Handlers of the sys actions over a :class:`UnitRegistry` and a :class:`KeyValueStore`."""

    def __init__(self, registry: UnitRegistry, store: KeyValueStore, leases: UnitLeases):
        self.registry = registry
        self.store = store
        self.leases = leases

    def dispatcher(self) -> RpcDispatcher:
        return RpcDispatcher(
            {
                sys_rpc.REGISTER_UNIT: self.register_unit,
                sys_rpc.RELEASE_UNIT: self.release_unit,
                sys_rpc.SQL_SELECT: self.sql_select,
                sys_rpc.SQL_SET: self.sql_set,
                sys_rpc.SQL_UNSET: self.sql_unset,
                sys_rpc.ALLOC_PORT: self.alloc_port,
                sys_rpc.RELEASE_PORT: self.release_port,
            }
        )

    def register_unit(self, data: bytes) -> bytes:
        unit = text(data)
        try:
            task = self.registry.register(unit)
        except RegistrationError as exc:
            log.error("register_unit %r refused: %s", unit, exc)
            return FALSE
        return sys_rpc.encode_registration(task.number, task.output_url, task.inference_url)

    def release_unit(self, data: bytes) -> bytes:
        self.registry.release(text(data))
        return SUCCESS

    def sql_select(self, data: bytes) -> bytes:
        return self.store.select(text(data)).encode("utf-8")

    def sql_set(self, data: bytes) -> bytes:
        entry = sys_rpc.decode_sql_set(data)
        if entry is None:
            return FALSE
        self.store.set(*entry)
        return SUCCESS

    def sql_unset(self, data: bytes) -> bytes:
        self.store.unset(text(data))
        return SUCCESS

    def alloc_port(self, data: bytes) -> bytes:
        lease = sys_rpc.decode_port_lease(data)
        if lease is None or not UNIT_NAME.match(lease[0]):
            return FALSE
        owner, port = lease
        try:
            return str(self.leases.lease(owner, port)).encode()
        except LeaseError as exc:
            log.warning("alloc_port for %r refused: %s", owner, exc)
            return FALSE

    def release_port(self, data: bytes) -> bytes:
        lease = sys_rpc.decode_port_lease(data)
        if lease is None or lease[1] is None or not UNIT_NAME.match(lease[0]):
            return FALSE
        owner, port = lease
        return SUCCESS if self.leases.release(port, owner) else FALSE
