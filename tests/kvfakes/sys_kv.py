"""A tiny sys RPC service (at ipc://<dir>/rpc.sys) with the key/value actions only.

``sql_select key`` -> value or empty; ``sql_set {"key","val"}`` -> ``Success`` (``False``
for an empty key); ``sql_unset key`` -> ``Success``; anything else -> ``NotAction``.
``calls`` records every request, ``store`` is the key/value store.
"""

from __future__ import annotations

import json

from edgellm.comm.rpc import RpcDispatcher
from edgellm.comm.rpc_thread import RpcServer


class SysKV(RpcServer):
    def __init__(self, runtime_dir: str):
        self.store: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        handlers = {name: (lambda data, name=name: self._reply(name, data.decode()))
                    for name in ("sql_select", "sql_set", "sql_unset")}  # fmt: skip
        super().__init__("sys", RpcDispatcher(handlers), runtime_dir=runtime_dir)

    def _reply(self, action: str, data: str) -> bytes:
        self.calls.append((action, data))
        if action == "sql_select":
            return self.store.get(data, "").encode()
        if action == "sql_set":
            req = json.loads(data)
            if not req.get("key"):
                return b"False"
            self.store[req["key"]] = req["val"]
            return b"Success"
        self.store.pop(data, None)
        return b"Success"
