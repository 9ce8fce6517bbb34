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
=============  ================================  ==========================================

Replies are byte-exact with the C++ original. Handlers run inline on the manager's event
loop (they are quick: a dict update or one ``bind``).
"""

from __future__ import annotations

import json
import logging

from edgellm.comm.rpc import RpcDispatcher
from edgellm.manager.store import KeyValueStore
from edgellm.manager.units import RegistrationError, UnitRegistry
from edgellm.protocol.params import set_param

log = logging.getLogger(__name__)

SUCCESS = b"Success"
FALSE = b"False"


class SysService:
    """Handlers of the sys actions over a :class:`UnitRegistry` and a :class:`KeyValueStore`."""

    def __init__(self, registry: UnitRegistry, store: KeyValueStore):
        self.registry = registry
        self.store = store

    def dispatcher(self) -> RpcDispatcher:
        return RpcDispatcher(
            {
                "register_unit": self.register_unit,
                "release_unit": self.release_unit,
                "sql_select": self.sql_select,
                "sql_set": self.sql_set,
                "sql_unset": self.sql_unset,
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


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
