"""A tiny sys RPC service (REP at ipc://<dir>/rpc.sys) with the key/value actions only.

Wire as the unit manager's: request frames ``[action, data]``, reply one frame.
``sql_select key`` -> value or empty; ``sql_set {"key","val"}`` -> ``Success`` (``False``
for an empty key); ``sql_unset key`` -> ``Success``; anything else -> ``NotAction``.
"""

from __future__ import annotations

import json
import os
import threading

import zmq


class SysKV:
    def __init__(self, runtime_dir: str):
        self.url = f"ipc://{runtime_dir}/rpc.sys"
        self.store: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self._ctx = zmq.Context.instance()
        self._ready = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-sys")

    def start(self) -> "SysKV":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def _reply(self, action: str, data: str) -> bytes:
        if action == "sql_select":
            return self.store.get(data, "").encode()
        if action == "sql_set":
            req = json.loads(data)
            if not req.get("key"):
                return b"False"
            self.store[req["key"]] = req["val"]
            return b"Success"
        if action == "sql_unset":
            self.store.pop(data, None)
            return b"Success"
        return b"NotAction"

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.REP)
        sock.linger = 0
        sock.bind(self.url)
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._stop_r, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._stop_r in ready:
                    return
                frames = sock.recv_multipart()
                action = frames[0].decode()
                data = frames[1].decode() if len(frames) > 1 else ""
                self.calls.append((action, data))
                sock.send(self._reply(action, data))
        finally:
            sock.close(linger=0)
            path = self.url[len("ipc://"):]
            if os.path.exists(path):
                os.unlink(path)

    def stop(self) -> None:
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(10)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
