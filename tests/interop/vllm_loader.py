"""Load vLLM's own, unchanged KV event code from ``.cache/`` (see
``scripts/fetch_vllm_kv_events.py``) without installing vLLM (it needs CUDA torch).

What runs is vLLM's real ``vllm/distributed/kv_events.py`` - ``ZmqEventPublisher`` (PUB +
ROUTER replay thread, sequence numbers, replay buffer, end marker), the ``EventBatch`` /
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` msgspec structs and their
encoding - byte for byte as in the sdist:

- vLLM 0.33.0 (``.cache/vllm``), with its real ``vllm/config/kv_events.py``, loaded as the
  modules ``vllm.distributed.kv_events`` and ``vllm.config.kv_events``;
- vLLM 0.10.0 (``.cache/vllm-0.10.0``, array-like events), loaded as the module
  ``vllm_0_10_0_kv_events`` (one process cannot hold two ``vllm.distributed.kv_events``).

Only the helper modules those files import are stand-ins, registered in ``sys.modules``
under vLLM's names:

- ``vllm.logger.init_logger`` -> ``logging.getLogger``;
- ``vllm.config.utils.config`` -> ``dataclasses.dataclass`` (vLLM: a pydantic dataclass
  forbidding extra fields; the publisher only constructs the config with valid fields);
- ``vllm.utils.network_utils``: ``get_tcp_uri``, ``is_valid_ipv6_address`` and
  ``split_zmq_path`` with vLLM's semantics; ``get_ip`` returns ``VLLM_HOST_IP`` when set,
  as vLLM's does, but falls back to ``127.0.0.1`` instead of the address of the route to
  8.8.8.8 (tests stay on loopback). vLLM calls it only to bind ``tcp://*:0``;
- ``vllm.v1.core.kv_cache_utils.ExternalBlockHash`` = ``bytes | int`` (as in vLLM);
- for 0.10.0 only, ``vllm.config.KVEventsConfig``: an empty class (that file uses it only
  in the annotation of ``EventPublisherFactory.create``, which the tests do not call).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import logging
import os
import sys
import types
from pathlib import Path
from urllib.parse import urlsplit

_CACHE = Path(__file__).resolve().parents[2] / ".cache"
CURRENT, OLD = "0.33.0", "0.10.0"
# version -> ((module name, file) in load order: config first, the publisher imports it)
_FILES = {
    CURRENT: (
        ("vllm.config.kv_events", _CACHE / "vllm" / "vllm" / "config" / "kv_events.py"),
        ("vllm.distributed.kv_events", _CACHE / "vllm" / "vllm" / "distributed" / "kv_events.py"),
    ),
    OLD: (
        ("vllm_0_10_0_kv_events",
         _CACHE / "vllm-0.10.0" / "vllm" / "distributed" / "kv_events.py"),
    ),
}  # fmt: skip


class _KVEventsConfigStandIn:
    """vLLM 0.10.0's ``vllm.config.KVEventsConfig`` stand-in (annotation use only)."""


def missing_reason(version: str = CURRENT) -> str | None:
    """Why vLLM ``version``'s files cannot be loaded (``None`` when they can)."""
    for _, path in _FILES[version]:
        if not path.is_file():
            return (f"vLLM {version}'s kv_events code is not in {path.parents[2]} "
                    "(run scripts/fetch_vllm_kv_events.py; needs network once)")  # fmt: skip
    return None


# --- stand-ins for the helper modules ------------------------------------------------


def _is_valid_ipv6_address(address: str) -> bool:
    try:
        ipaddress.IPv6Address(address)
        return True
    except ValueError:
        return False


def _get_tcp_uri(ip: str, port: int) -> str:
    return f"tcp://[{ip}]:{port}" if _is_valid_ipv6_address(ip) else f"tcp://{ip}:{port}"


def _get_ip() -> str:
    return os.environ.get("VLLM_HOST_IP") or "127.0.0.1"


def _split_zmq_path(path: str) -> tuple[str, str, str]:
    parsed = urlsplit(path)
    if not parsed.scheme:
        raise ValueError(f"Invalid zmq path: {path}")
    host = parsed.hostname or ""
    port = "" if parsed.port is None else str(parsed.port)
    if parsed.scheme == "tcp" and not (host and port):
        raise ValueError(f"Invalid zmq path: {path}")
    if parsed.scheme != "tcp" and port:
        raise ValueError(f"Invalid zmq path: {path}")
    return parsed.scheme, host, port


def _module(name: str, **attrs) -> types.ModuleType:
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so submodules can be registered under it
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def load(version: str = CURRENT) -> types.ModuleType:
    """vLLM ``version``'s ``kv_events`` module (loaded once per process).

    Raises ``RuntimeError`` with :func:`missing_reason` when the files are absent.
    """
    name = _FILES[version][-1][0]
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    reason = missing_reason(version)
    if reason:
        raise RuntimeError(reason)
    for package in ("vllm", "vllm.config", "vllm.distributed", "vllm.utils", "vllm.v1",
                    "vllm.v1.core"):  # fmt: skip
        _module(package)
    _module("vllm.logger", init_logger=logging.getLogger)
    _module("vllm.config.utils", config=dataclasses.dataclass)
    _module("vllm.utils.network_utils", get_ip=_get_ip, get_tcp_uri=_get_tcp_uri,
            is_valid_ipv6_address=_is_valid_ipv6_address,
            split_zmq_path=_split_zmq_path)  # fmt: skip
    _module("vllm.v1.core.kv_cache_utils", ExternalBlockHash=bytes | int)
    if version == OLD:
        _module("vllm.config", KVEventsConfig=_KVEventsConfigStandIn)
    for mod_name, path in _FILES[version]:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
        parent, _, child = mod_name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
    return sys.modules[name]
