"""The whole fabric as real processes, for the HTTP fuzzer and the soak (not a bench itself).

:class:`Stack` starts, in a work directory of its own: the unit manager (front door on a
port the OS picks, its runtime dir inside the work dir), the ``llm`` unit (the default
model, or ``model=NAME=PATH``), the echo unit (as unit ``echo``), the gateway in front of the
manager and, on request, ``kv-events`` following the manager's unit registry. Each child's
stderr goes to ``<work>/<name>.log``; :attr:`Stack.procs` maps names to ``Popen`` objects
(their pids for RSS and file descriptor readings). ``close()`` stops them in reverse order
with SIGTERM (SIGKILL after 30 s).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx

from _serve_parts import start, stop

FRONT_DOOR = re.compile(r"listening on ([\d.]+):(\d+)")
HTTP_URL = re.compile(r"listening on (http://[\d.]+:\d+)")


class Stack:
    """See the module docstring; ``api_key`` guards the gateway and kv-events."""

    def __init__(self, work: str, *, model: str | None = None, max_model_len: int | None = None,
                 kv_cache_mb: float = 64, threads: int = 1, kv_events: bool = False,
                 api_key: str | None = None, gateway_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.work = work
        self.api_key = api_key
        self.procs: dict[str, subprocess.Popen] = {}
        self.runtime = os.path.join(work, "rt")
        os.makedirs(self.runtime, exist_ok=True)
        base = [sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING"]
        key = ("--api-key", api_key) if api_key else ()
        try:
            line = self._start("manager", [*base, "unit-manager", "--port", "0", "--runtime-dir",
                                           self.runtime, "--box-name", "bench"], "listening on")  # fmt: skip
            self.front_door = ("127.0.0.1", int(FRONT_DOOR.search(line).group(2)))
            llm = [*base, "unit", "llm", "--runtime-dir", self.runtime, "--threads", str(threads),
                   "--kv-cache-mb", str(kv_cache_mb)]  # fmt: skip
            if model:
                llm += ["--model", model]
            if max_model_len:
                llm += ["--max-model-len", str(max_model_len)]
            self._start("llm", llm, "ready", timeout=600)
            self._start("echo", [*base, "unit", "echo", "--name", "echo", "--runtime-dir",
                                 self.runtime], "ready")  # fmt: skip
            line = self._start("gateway", [*base, "serve", "--port", "0", "--box",
                                           f"127.0.0.1:{self.front_door[1]}",
                                           "--refresh-interval", "0.5", *key, *gateway_args],
                               "listening on")  # fmt: skip
            self.url = HTTP_URL.search(line).group(1)
            if kv_events:
                line = self._start("kv_events", [*base, "kv-events", "--unit-registry",
                                                 self.runtime, "--http-port", "0", *key],
                                   "listening on")  # fmt: skip
                self.kv_url = HTTP_URL.search(line).group(1)
            self.models = self._wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _start(self, name: str, cmd: list[str], marker: str, timeout: float = 180.0) -> str:
        proc, line = start(cmd, marker, os.path.join(self.work, f"{name}.log"), timeout)
        self.procs[name] = proc
        return line

    def _wait_ready(self, timeout: float = 120.0) -> list[str]:
        """The gateway's model names, once it sees the box ready with its model."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                models = httpx.get(self.url + "/v1/models", headers=self.headers, timeout=5)
                names = [m["id"] for m in models.json().get("data", [])]
                if names:
                    return names
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError("the gateway never listed a model")

    def alive(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self.procs.items()}

    def log_text(self, name: str) -> str:
        with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
            return f.read()

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            stop(proc)
