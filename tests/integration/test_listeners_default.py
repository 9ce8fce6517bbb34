"""Who may get in, by default: every listener of the fabric binds loopback and says so when
it starts - the front door, the llm unit's KV event publisher (PUB and replay ROUTER), the
gateway and kv-events' HTTP; the sys RPC is an ipc file. Checked on the sockets themselves:
every listening TCP socket of each process (real processes, default flags)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import psutil
import pytest

from edgellm.comm.urls import is_loopback
from gateway_support import GatewayProcess
from manager_support import ManagerProcess, UnitProcess, _read_line_until

pytest.importorskip("torch")


def _listening(pid: int) -> list[str]:
    return sorted({c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN})  # fmt: skip


def _loopback(addresses: list[str]) -> bool:
    """IPv4-mapped counts (an IPv6-enabled socket bound to 127.0.0.1: ``::ffff:127.0.0.1``)."""
    return bool(addresses) and all(is_loopback(a) for a in addresses)


def test_every_listener_binds_loopback_and_says_so(tiny_model_dir, tmp_path):
    with tempfile.TemporaryDirectory(prefix="el-lb-", dir="/tmp") as runtime:
        procs = []
        try:
            manager = ManagerProcess(runtime, "--min-port", "33600", "--max-port", "33700")
            procs.append(manager)
            assert "(loopback only) listening on 127.0.0.1:" in manager.started_line
            with open(tmp_path / "unit.log", "wb") as log:  # the child keeps its own copy
                unit = UnitProcess(runtime, "llm", "llm", "--model", f"tiny={tiny_model_dir}",
                                   "--kv-cache-mb", "4", "--threads", "1", timeout=120,
                                   log_level="INFO", stderr=log)  # fmt: skip
            procs.append(unit)
            gateway = GatewayProcess("--box", f"127.0.0.1:{manager.port}")
            procs.append(gateway)
            assert gateway.started_line.startswith("gateway (loopback only; no API key)")
            kv = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING",
                                   "kv-events", "--unit-registry", runtime, "--http-port", "0"],
                                  stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
            try:
                line = _read_line_until(kv, "listening on", 60)
                assert "kv-events (loopback only; no API key) listening on http://127.0.0.1:" in line
                for name, pid in (("manager", manager.proc.pid), ("llm unit", unit.proc.pid),
                                  ("gateway", gateway.proc.pid), ("kv-events", kv.pid)):
                    assert _loopback(_listening(pid)), (name, _listening(pid))
                assert len(_listening(unit.proc.pid)) >= 1  # its PUB and ROUTER
                unit_log = (tmp_path / "unit.log").read_text()
                assert "KV event publisher (loopback only; plain tcp: anyone who reaches it " \
                       "may subscribe) on tcp://[::ffff:127.0.0.1]:" in unit_log
                assert os.path.exists(os.path.join(runtime, "rpc.sys"))  # the sys RPC: a file
            finally:
                kv.terminate()
                kv.wait(30)
                kv.stdout.close()
        finally:
            for proc in reversed(procs):
                proc.stop()
