"""The pod model shared by every discovery provider and the KV event manager.

A *pod* is one inference engine that publishes KV events: a Kubernetes pod, a host from
a static file, or a unit of the unit manager. ``pod_key`` names it uniquely
(``namespace/name`` on Kubernetes). The manager subscribes to a pod only if it
*qualifies* (AIBrix ``isPodSubscribable``): KV events enabled, phase ``Running``, an IP and a
model name.

AIBrix labels (Kubernetes), read by :func:`pod_from_labels`:

- ``model.aibrix.ai/kv-events-enabled`` = ``"true"`` to subscribe;
- ``model.aibrix.ai/name``: the model;
- ``model.aibrix.ai/lora-id``: the LoRA id (default ``-1``, no adapter).

Data parallelism: an engine with ``dp_size`` ranks publishes each rank's stream on its own
ports, ``pub_port + r`` / ``router_port + r`` (vLLM's convention), each with its own
sequence. :meth:`Pod.ranks` gives one pod per rank to follow; a rank's pod key is
``<pod_key>#dp<r>`` (the key its entries have in the index), or the pod key itself when
``dp_size`` is 1.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

KV_EVENTS_ENABLED_LABEL = "model.aibrix.ai/kv-events-enabled"
MODEL_LABEL = "model.aibrix.ai/name"
LORA_ID_LABEL = "model.aibrix.ai/lora-id"
DEFAULT_PUB_PORT = 5557
DEFAULT_ROUTER_PORT = 5558
RUNNING = "Running"
MAX_DP_SIZE = 256
_DECIMAL = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class Pod:
    """One engine publishing KV events. Immutable; providers emit new objects on change."""

    pod_key: str
    ip: str
    model: str
    lora_id: int = -1
    pub_port: int = DEFAULT_PUB_PORT
    router_port: int = DEFAULT_ROUTER_PORT
    labels: Mapping[str, str] = field(default_factory=dict, compare=True, hash=False)
    phase: str = RUNNING
    kv_events_enabled: bool = True
    dp_size: int = 1
    annotations: Mapping[str, str] = field(default_factory=dict, compare=True, hash=False)
    """Kubernetes annotations (e.g. where the gateway reaches the pod's API)."""

    def __post_init__(self) -> None:
        if not isinstance(self.pod_key, str) or not self.pod_key:
            raise ValueError("pod_key must be a non-empty string")
        for name in ("pub_port", "router_port"):
            port = getattr(self, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"{name} must be a TCP port, got {port!r}")
        if isinstance(self.lora_id, bool) or not isinstance(self.lora_id, int):
            raise ValueError(f"lora_id must be an int, got {self.lora_id!r}")
        dp = self.dp_size
        if isinstance(dp, bool) or not isinstance(dp, int) or not 1 <= dp <= MAX_DP_SIZE:
            raise ValueError(f"dp_size must be an int in 1..{MAX_DP_SIZE}, got {dp!r}")
        if max(self.pub_port, self.router_port) + dp - 1 >= 65536:
            raise ValueError(f"{dp} ranks from ports {self.pub_port}/{self.router_port} "
                             "pass 65535")  # fmt: skip
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))

    def ranks(self) -> list["Pod"]:
        """One pod per data-parallel rank: its own key and ports (see the module docstring)."""
        if self.dp_size == 1:
            return [self]
        return [dataclasses.replace(self, pod_key=f"{self.pod_key}#dp{r}", dp_size=1,
                                    pub_port=self.pub_port + r, router_port=self.router_port + r)
                for r in range(self.dp_size)]  # fmt: skip

    @property
    def qualifies(self) -> bool:
        """AIBrix's subscription condition: enabled, Running, has an IP and a model."""
        return bool(self.kv_events_enabled and self.phase == RUNNING and self.ip and self.model)

    def endpoint(self, port: int) -> str:
        """``tcp://ip:port``, bracketing IPv6 literals."""
        host = f"[{self.ip}]" if ":" in self.ip and not self.ip.startswith("[") else self.ip
        return f"tcp://{host}:{port}"

    @property
    def pub_endpoint(self) -> str:
        return self.endpoint(self.pub_port)

    @property
    def router_endpoint(self) -> str:
        return self.endpoint(self.router_port)


def lora_id_from_labels(labels: Mapping[str, str]) -> int:
    """``model.aibrix.ai/lora-id`` as AIBrix's ``extractLoraID`` reads it (Go
    ``strconv.ParseInt(s, 10, 64)``: an optional sign and decimal digits, in int64);
    ``-1`` when absent or anything else."""
    text = labels.get(LORA_ID_LABEL, "")
    if not _DECIMAL.fullmatch(text):
        return -1
    value = int(text)
    return value if -(1 << 63) <= value < 1 << 63 else -1


def pod_from_labels(
    pod_key: str,
    ip: str,
    labels: Mapping[str, str],
    phase: str,
    *,
    pub_port: int = DEFAULT_PUB_PORT,
    router_port: int = DEFAULT_ROUTER_PORT,
    dp_size: int = 1,
    annotations: Mapping[str, str] | None = None,
) -> Pod:
    """A :class:`Pod` from Kubernetes-style labels (AIBrix's label names)."""
    return Pod(
        pod_key=pod_key,
        ip=ip or "",
        model=labels.get(MODEL_LABEL, ""),
        lora_id=lora_id_from_labels(labels),
        pub_port=pub_port,
        router_port=router_port,
        labels=labels,
        phase=phase or "",
        kv_events_enabled=labels.get(KV_EVENTS_ENABLED_LABEL) == "true",
        dp_size=dp_size,
        annotations=annotations or {},
    )
