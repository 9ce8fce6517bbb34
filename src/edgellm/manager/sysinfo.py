"""What the ``sys`` actions ``hwinfo``, ``cmminfo``, ``lsmode`` and ``lsunit`` report.

``hwinfo`` follows StackFlow's fields: ``temperature`` (millidegrees C of thermal zone 0,
0 when the machine has none), ``cpu_loadavg`` (percent of CPU time busy since the previous
sample; StackFlow sleeps a second to measure, we never block the loop), ``mem`` (percent
of memory in use) and ``eth_info`` (``name``, ``ip``, ``speed`` per IPv4 interface).
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import re
import socket
import struct
from typing import Any, Iterable

log = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies from /proc/stat's first line (user nice system idle)."""
    fields = _read("/proc/stat").split("\n", 1)[0].split()[1:5]
    if len(fields) < 4:
        return 0.0, 0.0
    user, nice, system, idle = (float(x) for x in fields)
    return user + nice + system, user + nice + system + idle


class HwInfo:
    """Samples the machine; keeps the last CPU reading to compute the load between calls."""

    def __init__(self) -> None:
        self._last_cpu = _cpu_times()

    def sample(self) -> dict[str, Any]:
        busy, total = _cpu_times()
        last_busy, last_total = self._last_cpu
        self._last_cpu = (busy, total)
        span = total - last_total
        load = int((busy - last_busy) * 100 / span) if span > 0 else 0
        return {
            "temperature": _temperature(),
            "cpu_loadavg": load,
            "mem": _memory_percent(),
            "eth_info": _interfaces(),
        }


def _temperature() -> int:
    text = _read("/sys/class/thermal/thermal_zone0/temp").strip()
    return int(text) if text.lstrip("-").isdigit() else 0


def _memory_percent() -> int:
    values = _meminfo()
    total = values.get("MemTotal", 0)
    if total <= 0:
        return 0
    free = values.get("MemAvailable", values.get("MemFree", 0))
    return int((total - free) * 100 / total)


def _interfaces() -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                packed = fcntl.ioctl(
                    sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15])
                )
            except OSError:
                continue  # no IPv4 address
            ip = socket.inet_ntoa(packed[20:24])
            speed = _read(f"/sys/class/net/{name}/speed").strip()
            out.append({"name": name, "ip": ip, "speed": speed})
    return out


AX_CMM_INFO = "/proc/ax_proc/mem_cmm_info"
"""The NPU's contiguous memory on AXera boxes (what M5Stack's StackFlow reports)."""


def cmm_info(ax_path: str = AX_CMM_INFO, cgroup_dir: str = "/sys/fs/cgroup") -> dict[str, int]:
    """``{"total", "used", "remain"}`` in KiB of the memory models load into: the NPU's CMM
    where the box has one (``ax_path``, read as StackFlow does), else this machine's RAM
    (``MemTotal``; ``remain`` is ``MemAvailable``), capped by this process's cgroup (v2)
    memory limit when one is set."""
    text = _read(ax_path).strip()
    if text:
        last = text.splitlines()[-1]
        fields = {}
        for name in ("total size", "used", "remain"):
            m = re.search(rf"{name}=(\d+)", last)
            fields[name] = int(m.group(1)) if m else 0
        return {"total": fields["total size"], "used": fields["used"], "remain": fields["remain"]}
    values = _meminfo()
    total = values.get("MemTotal", 0)
    remain = values.get("MemAvailable", values.get("MemFree", 0))
    limit = _read(os.path.join(cgroup_dir, "memory.max")).strip()
    current = _read(os.path.join(cgroup_dir, "memory.current")).strip()
    if limit.isdigit() and current.isdigit():
        limit_kib, current_kib = int(limit) // 1024, int(current) // 1024
        total = min(total, limit_kib)
        remain = min(remain, max(0, limit_kib - current_kib))
    return {"total": total, "used": max(0, total - remain), "remain": remain}


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in _read("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0])
    return values


def list_models(directory: str) -> list[Any]:
    """The parsed ``*.json`` files of ``directory`` (StackFlow's ``config_lsmod_dir``)."""
    if not directory:
        return []
    models: list[Any] = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        try:
            with open(path, "rb") as fh:
                models.append(json.load(fh))
        except (OSError, ValueError) as exc:
            log.warning("lsmode: skipping %s: %s", path, exc)
    return models


def list_units(runtime_dir: str, tasks: Iterable[Any],
               registered: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Units with an RPC socket in ``runtime_dir`` (``rpc.<name>``, not ``sys``), a task or a
    registration (``registered``: name -> what the unit registered), each with its work ids;
    a registered one also with its ``pid``."""
    registered = registered or {}
    by_unit: dict[str, list[str]] = {name: [] for name in registered}
    for path in glob.glob(os.path.join(runtime_dir, "rpc.*")):
        name = os.path.basename(path)[4:]
        if name and name != "sys":
            by_unit.setdefault(name, [])
    for task in tasks:
        by_unit.setdefault(task.unit, []).append(task.work_id)
    units = []
    for name, ids in sorted(by_unit.items()):
        unit = {"unit": name, "rpc_url": f"ipc://{runtime_dir.rstrip('/')}/rpc.{name}",
                "tasks": ids, "registered": name in registered}  # fmt: skip
        info = registered.get(name)
        if isinstance(info, dict) and isinstance(info.get("pid"), int):
            unit["pid"] = info["pid"]
        units.append(unit)
    return units
