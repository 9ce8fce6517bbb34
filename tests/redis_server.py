"""A real ``redis-server`` for tests and benches: own process, loopback, no persistence."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis

__all__ = ["RedisServer", "find_redis_server"]


def find_redis_server() -> str | None:
    """The ``redis-server`` (or ``valkey-server``) binary, or ``None``."""
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            return path
    for path in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(path, os.X_OK):
            return path
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """Start with ``with RedisServer() as server:``; ``server.url`` to connect."""

    def __init__(self, binary: str | None = None, start_timeout: float = 15.0) -> None:
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise FileNotFoundError("redis-server not found (apt-get install -y redis-server)")
        self.start_timeout = start_timeout
        self.port = 0
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self._dir = tempfile.TemporaryDirectory(prefix="edgellm-redis-")
        for _ in range(5):  # the port was free a moment ago; another process may win it
            self.port = _free_port()
            self._proc = self._spawn()
            if self._wait_ready():
                return self
            self._kill()
        self.stop()
        raise RuntimeError("redis-server did not start")

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def snapshot(self) -> None:
        """Write the dataset to disk now (``SAVE``): a later :meth:`restart` with
        ``keep_data`` comes back with it, as a replica lagging behind would."""
        client = redis.Redis.from_url(self.url)
        try:
            client.save()
        finally:
            client.close()

    def restart(self, keep_data: bool = False) -> None:
        """Kill the server (SIGKILL) and start it again on the same port: empty, or with
        the last :meth:`snapshot` (writes after it are lost)."""
        assert self._proc is not None and self._dir is not None
        self._proc.kill()
        self._proc.wait(10)
        self._proc = None
        if not keep_data:
            dump = os.path.join(self._dir.name, "dump.rdb")
            if os.path.exists(dump):
                os.remove(dump)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:  # the port may linger a moment
            self._proc = self._spawn()
            if self._wait_ready():
                return
            self._kill()
            time.sleep(0.1)
        raise RuntimeError("redis-server did not restart")

    def used_memory(self) -> int:
        client = redis.Redis.from_url(self.url)
        try:
            return int(client.info("memory")["used_memory"])
        finally:
            client.close()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def stop(self) -> None:
        self._kill()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
