"""Helpers for the gateway's integration tests (not a test module).

- :class:`GatewayProcess`: ``edgellm serve --port 0 ...`` as a real process; waits for its
  ``listening on`` line, then (optionally) for ``/health`` to answer 200;
- :func:`http`: one raw HTTP exchange (status, headers, body) for the error cases;
- :func:`sse_events`: the ``data:`` payloads of a streamed answer.
"""

from __future__ import annotations

from http.client import HTTPConnection
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from manager_support import _read_line_until

GATEWAY_LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")


class GatewayProcess:
    """``edgellm serve`` on a free port until :meth:`stop`."""

    def __init__(self, *args: str, wait_ready: bool = True, env: dict[str, str] | None = None,
                 log_level: str = "WARNING", timeout: float = 60.0):  # fmt: skip
        self.headers = ({"Authorization": f"Bearer {args[args.index('--api-key') + 1]}"}
                        if "--api-key" in args else {})  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.cli", "--log-level", log_level, "serve",
             "--port", "0", "--refresh-interval", "0.2", *args],
            stdout=subprocess.PIPE, bufsize=0, env={**os.environ, **(env or {})},
        )  # fmt: skip
        try:
            line = _read_line_until(self.proc, GATEWAY_LISTENING.pattern, timeout)
            self.started_line = line.strip()
            match = GATEWAY_LISTENING.search(line)
            self.host, self.port = match.group(1), int(match.group(2))
            self.url = f"http://{self.host}:{self.port}"
            if wait_ready:
                self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout: float = 60.0, models: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, _, body = http(self, "GET", "/health")
                if status == 200:
                    listing = json.loads(http(self, "GET", "/v1/models", headers=self.headers)[2])
                    if len(listing["data"]) >= models:
                        return json.loads(body)
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready within {timeout}s")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def http(target, method: str, path: str, body: bytes | str | dict | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, dict, bytes]:  # fmt: skip
    """One request to ``target`` (anything with ``host`` and ``port``)."""
    if isinstance(body, dict):
        body = json.dumps(body)
    conn = HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def error_of(body: bytes) -> dict[str, Any]:
    """The ``error`` object of an OpenAI error answer, checking its shape."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def sse_events(body: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    out = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            out.append(block[6:])
    return out
