"""The gateway's settings: one frozen, validated object (flags and env land here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgellm.comm.curve import CurveClient
from edgellm.gateway.routing import STRATEGIES
from edgellm.httpapi import HttpLimits


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    strategy: str = "prefix-cache"
    """The routing strategy of requests without a ``routing-strategy`` header."""
    max_queue: int = 32
    """Requests in flight per backend (sent, not finished) before it takes no more; when
    every backend of a model is full: 429 with ``Retry-After``."""
    request_timeout: float = 600.0
    """Seconds a request may run in all (first piece to last); then 504 / an error event."""
    first_piece_timeout: float = 120.0
    """Seconds a backend may take to produce a request's first piece before the request is
    tried elsewhere."""
    drain_timeout: float = 30.0
    """On SIGTERM: seconds requests in flight get to finish before they are ended with an
    error."""
    max_attempts: int = 3
    """Backends one request may be tried on (failures before the first piece)."""
    refresh_interval: float = 1.0
    """Seconds between health / model / load checks of every backend."""
    limits: HttpLimits = field(default_factory=HttpLimits)
    kv_curve: CurveClient | None = field(default=None, repr=False)
    """CURVE keys of the embedded KV event subscribers (:mod:`edgellm.comm.curve`)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {self.strategy!r}: one of {STRATEGIES}")
        for name in ("max_queue", "max_attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("request_timeout", "first_piece_timeout", "drain_timeout", "refresh_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0..65535, got {self.port}")
