"""ZeroMQ addresses of the StackFlow comm layer.

- An RPC service name ``X`` means ``ipc://<runtime_dir>/rpc.X`` (upstream: ``/tmp``); a
  string containing ``://`` is already a full URL.
- ``ipc://`` endpoints are files: the binding side creates the parent directory owner-only
  (upstream makes ``/tmp/llm`` world-writable; we don't), gives the socket file the same
  permissions minus execute (``0600`` by default); the endpoint removes the file when it
  closes (:class:`edgellm.comm.endpoints.Endpoint`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat

import zmq

log = logging.getLogger(__name__)

DEFAULT_RUNTIME_DIR = "/tmp"
IPC_SCHEME = "ipc://"


def is_loopback(host: str) -> bool:
    """Whether a listener on ``host`` (an address or ``localhost``) takes only this
    machine's clients."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    # an IPv6-enabled socket bound to 127.0.0.1 reports ::ffff:127.0.0.1
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def tcp_host(url: str) -> str | None:
    """The host of a ``tcp://HOST:PORT`` url (brackets removed), None for other transports."""
    if not url.startswith("tcp://"):
        return None
    return url[len("tcp://"):].rpartition(":")[0].strip("[]")


def rpc_url(name: str, runtime_dir: str = DEFAULT_RUNTIME_DIR) -> str:
    """The RPC endpoint of service ``name`` (``sys``, ``llm``...) or ``name`` if already a URL."""
    if "://" in name:
        return name
    if not name:
        raise ValueError("RPC service name is empty")
    return f"{IPC_SCHEME}{runtime_dir.rstrip('/') or ''}/rpc.{name}"


def ipc_path(url: str) -> str | None:
    """Filesystem path of an ``ipc://`` URL, ``None`` for other transports."""
    if url.startswith(IPC_SCHEME):
        return url[len(IPC_SCHEME) :]
    return None


def prepare_bind(url: str, dir_mode: int = 0o700) -> None:
    """Make the directory an ``ipc://`` endpoint lives in (mode ``dir_mode`` when created)
    and clear a stale socket file left by a crashed process. No-op for other transports."""
    path = ipc_path(url)
    if path is None:
        return
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, mode=dir_mode, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def bind(sock: zmq.Socket, url: str, dir_mode: int = 0o700) -> None:
    """Bind ``sock`` at ``url``; for ``ipc://`` see :func:`prepare_bind`, and the socket
    file gets ``dir_mode`` without execute bits (who may connect)."""
    prepare_bind(url, dir_mode)
    sock.bind(url)
    path = ipc_path(url)
    if path is not None:
        try:
            os.chmod(path, dir_mode & 0o666)
        except OSError as exc:  # e.g. an abstract socket name: nothing to chmod
            log.debug("chmod %s: %s", path, exc)


def endpoint_exists(url: str) -> bool:
    """False only when ``url`` is ``ipc://`` and nothing is bound there (no file)."""
    path = ipc_path(url)
    return path is None or os.path.exists(path)


def ipc_refuses(url: str) -> bool:
    """True when ``url`` is ``ipc://`` and its file is there but nothing accepts connections
    on it (the file of a process that died); False when something listens (or is too busy to
    accept right now), or for other transports. Costs one connect, closed at once."""
    path = ipc_path(url)
    if path is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except BlockingIOError:  # its accept queue is full: alive
            return False
        except OSError as exc:
            return exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    return False
