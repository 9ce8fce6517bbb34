"""Where backends are: flags, a file, Kubernetes - all reduced to specs.

- :class:`BoxSpec`: a unit manager's TCP front door, ``HOST:PORT`` (``[v6]:PORT``; the port
  defaults to 10001). Its models and KV event endpoints are learned from the box itself.
- :class:`EngineSpec`: an OpenAI-compatible HTTP engine (vLLM, or another ``edgellm serve``):
  its base URL, and where it publishes KV events, which an HTTP API does not say:
  ``URL[,pod_key=K][,kv_host=H][,pub_port=P][,router_port=R][,block_size=B][,model=M]...``.

A backends file (JSON, or YAML for any other suffix) is a list of entries, each either
``{"box": "HOST:PORT"}`` or ``{"url": ..., "pod_key"?, "kv_host"?, "pub_port"?,
"router_port"?, "block_size"?, "models"?: [...], "api_key"?}``; unknown keys are an error.

On Kubernetes a pod (selected as for ``kv-events``: AIBrix's labels) needs a serving
address beside its event ports: annotation ``serving.edgellm.io/port`` (default 8000, vLLM's)
and ``serving.edgellm.io/protocol``: ``openai`` (default; an HTTP engine at the pod's IP) or
``stackflow`` (a unit manager's front door at that port).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

from edgellm.discovery.pod import Pod

DEFAULT_FRONT_DOOR_PORT = 10001
DEFAULT_ENGINE_PORT = 8000
SERVE_PORT_ANNOTATION = "serving.edgellm.io/port"
PROTOCOL_ANNOTATION = "serving.edgellm.io/protocol"


class SpecError(ValueError):
    """A backend description that cannot be used (the message says why)."""


@dataclass(frozen=True)
class BoxSpec:
    host: str
    port: int = DEFAULT_FRONT_DOOR_PORT


@dataclass(frozen=True)
class EngineSpec:
    url: str
    pod_key: str | None = None
    kv_host: str | None = None
    pub_port: int | None = None
    router_port: int | None = None
    block_size: int | None = None
    models: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return self.pod_key or self.url

    def kv_pod(self, model: str) -> Pod | None:
        """Where this engine publishes ``model``'s KV events; None if not given."""
        if self.pub_port is None:
            return None
        host = self.kv_host or urlsplit(self.url).hostname or ""
        return Pod(self.key, host, model, pub_port=self.pub_port,
                   router_port=self.router_port or self.pub_port + 1)  # fmt: skip


def parse_box(text: str) -> BoxSpec:
    """``HOST[:PORT]`` / ``[V6][:PORT]`` -> :class:`BoxSpec`; raises :class:`SpecError`."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise SpecError(f"box {text!r}: no host")
    return BoxSpec(host, _port(port, f"box {text!r}") if port else DEFAULT_FRONT_DOOR_PORT)


def parse_engine(text: str) -> EngineSpec:
    """``URL[,key=value...]`` (see the module docstring) -> :class:`EngineSpec`."""
    url, *options = [part.strip() for part in text.split(",")]
    entry: dict[str, Any] = {"url": url}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep:
            raise SpecError(f"engine {text!r}: {option!r} is not key=value")
        if name == "model":
            entry.setdefault("models", []).append(value)
        elif name in ("pub_port", "router_port", "block_size"):
            entry[name] = _int(value, f"engine {text!r}: {name}")
        else:
            entry[name] = value
    return engine_from_entry(entry)


_ENGINE_KEYS = {"url", "pod_key", "kv_host", "pub_port", "router_port", "block_size", "models",
                "api_key"}  # fmt: skip


def engine_from_entry(entry: dict[str, Any]) -> EngineSpec:
    unknown = set(entry) - _ENGINE_KEYS
    if unknown:
        raise SpecError(f"engine: unknown keys {sorted(unknown)}")
    url = entry.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(f"engine: {url!r} is not an http(s) URL")
    for name in ("pub_port", "router_port"):
        if entry.get(name) is not None:
            _port(entry[name], f"engine {url}: {name}")
    block = entry.get("block_size")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise SpecError(f"engine {url}: block_size must be an int >= 1")
    models = entry.get("models") or ()
    if not isinstance(models, (list, tuple)) or not all(isinstance(m, str) and m for m in models):
        raise SpecError(f"engine {url}: models must be a list of names")
    for name in ("pod_key", "kv_host", "api_key"):
        if entry.get(name) is not None and not isinstance(entry[name], str):
            raise SpecError(f"engine {url}: {name} must be a string")
    return EngineSpec(url.rstrip("/"), entry.get("pod_key"), entry.get("kv_host"),
                      entry.get("pub_port"), entry.get("router_port"), block, tuple(models),
                      entry.get("api_key"))  # fmt: skip


def parse_backends(text: str, *, as_json: bool = False) -> list[BoxSpec | EngineSpec]:
    """A backends file's content -> specs; raises :class:`SpecError`."""
    try:
        data = json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError(f"not valid {'JSON' if as_json else 'YAML'}: {exc}") from None
    if not isinstance(data, list):
        raise SpecError("expected a list of backends ({box: ...} or {url: ...})")
    specs: list[BoxSpec | EngineSpec] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise SpecError(f"backend {i}: expected a mapping")
        try:
            if "box" in entry:
                if set(entry) != {"box"} or not isinstance(entry["box"], str):
                    raise SpecError("a box entry is {box: 'HOST:PORT'} and nothing else")
                specs.append(parse_box(entry["box"]))
            else:
                specs.append(engine_from_entry(entry))
        except SpecError as exc:
            raise SpecError(f"backend {i}: {exc}") from None
    return specs


def spec_from_pod(pod: Pod) -> BoxSpec | EngineSpec | None:
    """The backend a discovered pod serves (see the module docstring); None if unusable."""
    if not pod.qualifies:
        return None
    annotations = getattr(pod, "annotations", None) or {}
    protocol = annotations.get(PROTOCOL_ANNOTATION, "openai")
    default = DEFAULT_FRONT_DOOR_PORT if protocol == "stackflow" else DEFAULT_ENGINE_PORT
    try:
        port = _port(annotations.get(SERVE_PORT_ANNOTATION, default), "serving port")
    except SpecError:
        return None
    host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
    if protocol == "stackflow":
        return BoxSpec(pod.ip, port)
    if protocol != "openai":
        return None
    return EngineSpec(f"http://{host}:{port}", pod.pod_key, pod.ip, pod.pub_port,
                      pod.router_port, models=(pod.model,))  # fmt: skip


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SpecError(f"{what}: {value!r} is not a number") from None


def _port(value: Any, what: str) -> int:
    port = _int(value, what) if not isinstance(value, bool) else -1
    if not 0 < port < 65536:
        raise SpecError(f"{what}: {value!r} is not a TCP port")
    return port
