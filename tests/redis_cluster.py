"""A real three-master Redis Cluster on loopback, for tests and benches.

``redis-server --cluster-enabled yes`` per node (no persistence), joined by ``redis-cli
--cluster create``. Ports are taken by starting the server on them: a node that cannot
bind (another process won the port meanwhile) fails to start and is started again on
other ports, so no port is ever assumed free.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import redis

from redis_server import _free_port, find_redis_server

__all__ = ["RedisCluster"]


class RedisCluster:
    """``with RedisCluster() as cluster:``; ``cluster.url`` names its first node."""

    def __init__(self, masters: int = 3, start_timeout: float = 30.0) -> None:
        self.binary = find_redis_server()
        self.cli = shutil.which("redis-cli")
        if self.binary is None or self.cli is None:
            raise FileNotFoundError("redis-server / redis-cli not found (apt-get install redis-server)")
        self.masters = masters
        self.start_timeout = start_timeout
        self.ports: list[int] = []
        self._procs: list[subprocess.Popen] = []
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> "RedisCluster":
        self._dir = tempfile.TemporaryDirectory(prefix="edgellm-rcluster-")
        try:
            for i in range(self.masters):
                self._start_node(i)
            subprocess.run(
                [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=self.start_timeout)
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, i: int) -> None:
        for _ in range(10):
            port, bus = _free_port(), _free_port()
            if port == bus:
                continue
            workdir = f"{self._dir.name}/{i}-{port}"
            subprocess.run(["mkdir", "-p", workdir], check=True)
            proc = subprocess.Popen(
                [self.binary, "--port", str(port), "--cluster-port", str(bus),
                 "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"{workdir}/nodes.conf", "--save", "",
                 "--appendonly", "no", "--dir", workdir, "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._ping(proc, port):
                self._procs.append(proc)
                self.ports.append(port)
                return
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        raise RuntimeError("a cluster node did not start")

    def _ping(self, proc: subprocess.Popen, port: int) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + self.start_timeout
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return False
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        for port in self.ports:
            client = redis.Redis(host="127.0.0.1", port=port)
            try:
                while client.cluster("info").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the cluster did not become ok")
                    time.sleep(0.05)
            finally:
                client.close()

    def used_memory(self) -> int:
        total = 0
        for port in self.ports:
            client = redis.Redis(host="127.0.0.1", port=port)
            try:
                total += int(client.info("memory")["used_memory"])
            finally:
                client.close()
        return total

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._procs.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
