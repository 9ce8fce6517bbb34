"""Unit manager configuration: one frozen, validated :class:`ManagerConfig`.

Sources, lowest precedence first:

1. defaults (the C++ original's, spec 1 §3.1);
2. ``sys_config.json`` in the working directory, as upstream: a JSON object whose number and
   string values override the keys of the same name (other value types are ignored, an
   unreadable file is ignored with a warning);
3. environment variables ``EDGELLM_<FIELD>`` (e.g. ``EDGELLM_PORT``);
4. command-line flags (``--port`` ...).

========================  ==========================  ========================================
field                     sys_config.json key         meaning
========================  ==========================  ========================================
host                      config_tcp_host             TCP listen address (127.0.0.1)
port                      config_tcp_server           TCP port (10001; 0 = any free port)
enable_tcp                config_enable_tcp           serve TCP at all (1)
listen_backlog            config_listen_backlog       TCP accept queue (4096, the usual somaxconn; the
                                                      kernel caps it at net.core.somaxconn)
runtime_dir               config_runtime_dir          rpc.* sockets; unit/session sockets under
                                                      ``<runtime_dir>/llm`` (/tmp)
zmq_s_format              config_zmq_s_format         server-side url format (``ipc://D/llm/%i.sock``)
zmq_c_format              config_zmq_c_format         client-side url format (same)
min_port, max_port        config_zmq_min/max_port     unit url port pool, max excluded (5010, 5555)
work_id                   config_work_id              first work id number (0)
request_timeout           config_request_timeout      seconds a request may wait for its next
                                                      answer before the client gets an error (30)
setup_timeout             config_setup_timeout        the same for ``setup``, which may load a
                                                      model (300)
rpc_timeout               config_rpc_timeout          seconds for a unit's RPC reply (3)
orphan_timeout            config_orphan_timeout       seconds a task may go without a subscriber
                                                      after its last one left (its unit died)
                                                      before the manager releases it (30); one
                                                      that never subscribed gets setup_timeout
max_message_bytes         config_max_message_bytes    per-message limit on TCP input (1 MiB)
message_idle_timeout      config_message_idle_timeout seconds an incomplete message may wait
                                                      for its next bytes before it is answered
                                                      -2 and dropped (10)
answer_gap_ms             config_answer_gap_ms        least milliseconds between two answers
                                                      written to one client (0: none); for
                                                      clients that take one recv() for one
                                                      message, as upstream's sample/test.py
ipc_mode                  config_ipc_mode             mode of created ipc dirs (0700; sockets
                                                      get the same bits minus execute)
lsmod_dir                 config_lsmod_dir            directory of model ``*.json`` for lsmode
allow_reboot              config_allow_reboot         ``sys`` ``reboot`` runs reboot_command (0:
                                                      refused with -10)
reboot_command            config_reboot_command       what ``reboot`` runs (split like a shell
                                                      line, run without one), e.g. ``systemctl
                                                      reboot``; required with allow_reboot
box_name                  config_box_name             this box's name in pod keys
                                                      (``<box>/<unit>``); default: the host name
========================  ==========================  ========================================

The url formats default to ones derived from ``runtime_dir``; set explicitly, they win.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
from dataclasses import dataclass, fields
from typing import Any, Mapping

from edgellm.comm.urls import DEFAULT_RUNTIME_DIR

log = logging.getLogger(__name__)

CONFIG_FILE = "sys_config.json"
_BOX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ENV_PREFIX = "EDGELLM_"

# sys_config.json key -> field name.
FILE_KEYS: dict[str, str] = {
    "config_tcp_host": "host",
    "config_tcp_server": "port",
    "config_enable_tcp": "enable_tcp",
    "config_listen_backlog": "listen_backlog",
    "config_runtime_dir": "runtime_dir",
    "config_zmq_s_format": "zmq_s_format",
    "config_zmq_c_format": "zmq_c_format",
    "config_zmq_min_port": "min_port",
    "config_zmq_max_port": "max_port",
    "config_work_id": "work_id",
    "config_request_timeout": "request_timeout",
    "config_setup_timeout": "setup_timeout",
    "config_rpc_timeout": "rpc_timeout",
    "config_orphan_timeout": "orphan_timeout",
    "config_max_message_bytes": "max_message_bytes",
    "config_message_idle_timeout": "message_idle_timeout",
    "config_answer_gap_ms": "answer_gap_ms",
    "config_ipc_mode": "ipc_mode",
    "config_lsmod_dir": "lsmod_dir",
    "config_box_name": "box_name",
    "config_allow_reboot": "allow_reboot",
    "config_reboot_command": "reboot_command",
}


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def default_url_format(runtime_dir: str) -> str:
    return f"ipc://{runtime_dir.rstrip('/')}/llm/%i.sock"


@dataclass(frozen=True)
class ManagerConfig:
    host: str = "127.0.0.1"
    port: int = 10001
    enable_tcp: bool = True
    listen_backlog: int = 4096
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    zmq_s_format: str = ""  # "" = derived from runtime_dir
    zmq_c_format: str = ""
    min_port: int = 5010
    max_port: int = 5555
    work_id: int = 0
    request_timeout: float = 30.0
    setup_timeout: float = 300.0
    rpc_timeout: float = 3.0
    orphan_timeout: float = 30.0
    max_message_bytes: int = 1 << 20
    message_idle_timeout: float = 10.0
    answer_gap_ms: float = 0.0
    ipc_mode: int = 0o700
    lsmod_dir: str = ""
    box_name: str = ""  # "" = the host name
    allow_reboot: bool = False
    reboot_command: str = ""

    def __post_init__(self) -> None:
        if not self.box_name:
            object.__setattr__(self, "box_name", socket.gethostname() or "localhost")
        if not self.zmq_s_format:
            object.__setattr__(self, "zmq_s_format", default_url_format(self.runtime_dir))
        if not self.zmq_c_format:
            object.__setattr__(self, "zmq_c_format", default_url_format(self.runtime_dir))
        self._validate()

    def _validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is outside 0..65535")
        if not 1 <= self.listen_backlog <= 65535:
            raise ConfigError(f"listen_backlog {self.listen_backlog} is outside 1..65535")
        if not self.runtime_dir:
            raise ConfigError("runtime_dir is empty")
        for name in ("zmq_s_format", "zmq_c_format"):
            fmt = getattr(self, name)
            try:
                probe = fmt % 5010
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{name} {fmt!r} is not a format with one %i: {exc}") from None
            if probe == fmt or "://" not in fmt:
                raise ConfigError(f"{name} {fmt!r} must be a url with one %i (or %d)")
        if len((self.zmq_c_format % 65535).encode()) > 127:
            # it travels as set_param's first parameter, which C++ peers read with a signed byte
            raise ConfigError(f"zmq_c_format {self.zmq_c_format!r} gives urls over 127 bytes")
        if not 0 < self.min_port < self.max_port <= 65536:
            raise ConfigError(f"port pool {self.min_port}..{self.max_port} is empty or invalid")
        if self.max_port - self.min_port < 2:
            raise ConfigError("port pool must hold at least two ports (one unit task)")
        if self.work_id < 0:
            raise ConfigError("work_id must be >= 0")
        for name in ("request_timeout", "setup_timeout", "rpc_timeout", "orphan_timeout",
                     "message_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if not 0 <= self.answer_gap_ms <= 10_000:
            raise ConfigError("answer_gap_ms must be within 0..10000")
        if self.max_message_bytes < 64:
            raise ConfigError("max_message_bytes must be at least 64")
        if self.allow_reboot:
            try:
                words = shlex.split(self.reboot_command)
            except ValueError as exc:
                raise ConfigError(f"reboot_command {self.reboot_command!r}: {exc}") from None
            if not words:
                raise ConfigError("allow_reboot needs reboot_command (what a reboot runs)")
        if not _BOX_NAME.match(self.box_name):
            raise ConfigError(f"box_name {self.box_name!r} must be 1-63 of [A-Za-z0-9._-]")
        if not 0 <= self.ipc_mode <= 0o777 or not self.ipc_mode & 0o700 == 0o700:
            raise ConfigError(f"ipc_mode {oct(self.ipc_mode)} must keep rwx for the owner")

    @property
    def uses_ipc_suffix(self) -> bool:
        """Upstream appends ``.<unit>.output_url`` etc. to formats that contain ``sock``."""
        return "sock" in self.zmq_s_format

    def session_url(self, connection_id: int) -> str:
        """Where a session's PULL binds."""
        return self.zmq_s_format % connection_id

    def client_url(self, connection_id: int) -> str:
        """What units PUSH to for that session (the ``zmq_com`` value)."""
        return self.zmq_c_format % connection_id


def _coerce(name: str, value: Any) -> Any:
    """Turn a file/env/flag value into the field's type, or raise :class:`ConfigError`."""
    kind = {f.name: f.type for f in fields(ManagerConfig)}[name]
    try:
        if name == "ipc_mode":
            if isinstance(value, str):
                return int(value, 8)
            return int(value)
        if kind == "bool":
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(int(value))
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {kind}") from None


def read_config_file(path: str = CONFIG_FILE) -> dict[str, Any]:
    """The number and string values of ``path`` (upstream's rule), ``{}`` if absent/unreadable."""
    try:
        with open(path, "rb") as fh:
            body = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    if not isinstance(body, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return {}
    return {
        key: value
        for key, value in body.items()
        if isinstance(value, (int, float, str)) and not isinstance(value, bool)
    }


def load_config(
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    file_values: Mapping[str, Any] | None = None,
) -> ManagerConfig:
    """Build the config from defaults < ``file_values`` < ``env`` < ``overrides``.

    ``file_values`` defaults to :func:`read_config_file` in the working directory, ``env``
    to ``os.environ``; ``overrides`` are flag values by field name (``None`` = not given).
    Raises :class:`ConfigError` on a bad value from any source.
    """
    values: dict[str, Any] = {}
    file_values = read_config_file() if file_values is None else file_values
    for key, value in file_values.items():
        name = FILE_KEYS.get(key)
        if name is not None:
            values[name] = _coerce(name, value)
    env = os.environ if env is None else env
    for f in fields(ManagerConfig):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None and raw != "":
            values[f.name] = _coerce(f.name, raw)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    return ManagerConfig(**values)


__all__ = [
    "CONFIG_FILE",
    "ConfigError",
    "FILE_KEYS",
    "ManagerConfig",
    "load_config",
    "read_config_file",
]
