"""The ``sys`` RPC service units call (spec 1 §3.2), served at ``rpc.sys``.

=============  ================================  ==========================================
action         data                              reply
=============  ================================  ==========================================
register_unit  unit name (``llm``)               ``set_param(str(n), set_param(output_url,
                                                 inference_url))``; ``False`` if refused
release_unit   work id (``llm.3``)               ``Success`` (also for an unknown work id)
sql_select     key                               the value, ``""`` if none
sql_set        ``{"key": .., "val": ..}``        ``Success``; ``False`` if the key is empty
                                                 or the data is not such an object
sql_unset      key                               ``Success``
alloc_port     ``<unit>`` or ``<unit>:<port>``   a port of the pool leased to the unit (the
                                                 lowest free, or that one), as decimal text;
                                                 ``False`` if none / taken
release_port   ``<unit>:<port>``                 ``Success``; ``False`` if not its lease
=============  ================================  ==========================================

Replies are byte-exact with the C++ original. ``alloc_port`` / ``release_port`` are ours
(:mod:`edgellm.manager.leases`): units that listen on ports of their own (the llm unit's KV
event publisher) take them from the manager's pool. Handlers run inline on the manager's event
loop (they are quick: a dict update or one ``bind``).
"""

from __future__ import annotations

import json
import logging

from edgellm.comm.rpc import RpcDispatcher
from edgellm.manager.leases import LeaseError, UnitLeases
from edgellm.manager.store import KeyValueStore
from edgellm.manager.units import UNIT_NAME, RegistrationError, UnitRegistry
from edgellm.protocol.params import set_param

log = logging.getLogger(__name__)

SUCCESS = b"Success"
FALSE = b"False"


class SysService:
    """Handlers of the sys actions over a :class:`UnitRegistry` and a :class:`KeyValueStore`."""

    def __init__(self, registry: UnitRegistry, store: KeyValueStore, leases: UnitLeases):
        self.registry = registry
        self.store = store
        self.leases = leases

    def dispatcher(self) -> RpcDispatcher:
        return RpcDispatcher(
            {
                "register_unit": self.register_unit,
                "release_unit": self.release_unit,
                "sql_select": self.sql_select,
                "sql_set": self.sql_set,
                "sql_unset": self.sql_unset,
                "alloc_port": self.alloc_port,
                "release_port": self.release_port,
            }
        )

    def register_unit(self, data: bytes) -> bytes:
        unit = _text(data)
        try:
            task = self.registry.register(unit)
        except RegistrationError as exc:
            log.error("register_unit %r refused: %s", unit, exc)
            return FALSE
        return set_param(str(task.number), set_param(task.output_url, task.inference_url))

    def release_unit(self, data: bytes) -> bytes:
        self.registry.release(_text(data))
        return SUCCESS

    def sql_select(self, data: bytes) -> bytes:
        return self.store.select(_text(data)).encode("utf-8")

    def sql_set(self, data: bytes) -> bytes:
        try:
            body = json.loads(data)
        except ValueError:
            return FALSE
        if not isinstance(body, dict):
            return FALSE
        key = body.get("key")
        val = body.get("val", "")
        if not isinstance(key, str) or not key:
            return FALSE
        if not isinstance(val, str):
            # upstream reads the raw JSON text of a non-string value
            val = json.dumps(val, ensure_ascii=False, separators=(",", ":"))
        self.store.set(key, val)
        return SUCCESS

    def sql_unset(self, data: bytes) -> bytes:
        self.store.unset(_text(data))
        return SUCCESS


    def alloc_port(self, data: bytes) -> bytes:
        owner, port = _owner_port(_text(data))
        if owner is None:
            return FALSE
        try:
            return str(self.leases.lease(owner, port)).encode()
        except LeaseError as exc:
            log.warning("alloc_port for %r refused: %s", owner, exc)
            return FALSE

    def release_port(self, data: bytes) -> bytes:
        owner, port = _owner_port(_text(data))
        if owner is None or port is None:
            return FALSE
        return SUCCESS if self.leases.release(port, owner) else FALSE


def _owner_port(text: str) -> tuple[str | None, int | None]:
    """``<unit>`` or ``<unit>:<port>`` -> (unit, port or None); (None, None) if malformed."""
    owner, sep, port_text = text.partition(":")
    if not UNIT_NAME.match(owner):
        return None, None
    if not sep:
        return owner, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None, None
    return owner, int(port_text)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
