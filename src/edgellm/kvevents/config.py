"""Configuration of the KV event pipeline: one frozen, validated object per component.

- :class:`SubscriberConfig`: one pod's client (AIBrix defaults: ports 5557/5558 live on the
  pod, poll 100 ms, replay timeout 5 s, reconnect delay 1 s doubling to 30 s, IPv6 on),
  plus what the §4 behaviour needs (queue bound, idle probe).
- :class:`ManagerConfig`: the manager (enabled switch, index readiness wait 30 s / poll 1 s).
  :meth:`ManagerConfig.from_env` reads AIBrix's switches: the pipeline is enabled only if
  both ``AIBRIX_PREFIX_CACHE_KV_EVENT_SYNC_ENABLED`` and
  ``AIBRIX_PREFIX_CACHE_USE_REMOTE_TOKENIZER`` are true (the index needs exact token
  ids, which only a remote tokenizer shared with the engines guarantees), read as AIBrix's
  ``utils.LoadEnvBool`` does (:func:`env_flag`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping

from edgellm.comm.curve import CurveClient

log = logging.getLogger(__name__)

ENV_SYNC_ENABLED = "AIBRIX_PREFIX_CACHE_KV_EVENT_SYNC_ENABLED"
ENV_REMOTE_TOKENIZER = "AIBRIX_PREFIX_CACHE_USE_REMOTE_TOKENIZER"


# Go's strconv.ParseBool, which AIBrix's LoadEnvBool uses (exact spellings, no blanks).
_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))
_FALSE = frozenset(("0", "f", "F", "FALSE", "false", "False"))


def env_flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    """AIBrix's ``LoadEnvBool``: unset or empty gives ``default``; ``1 t T TRUE true True``
    are on, ``0 f F FALSE false False`` off; anything else is logged and gives ``default``."""
    value = env.get(name, "")
    if value == "":
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    log.warning("invalid %s: %r, falling back to default: %s", name, value, default)
    return default


@dataclass(frozen=True)
class SubscriberConfig:
    """How one pod's client talks to its engine."""

    poll_timeout: float = 0.1
    replay_timeout: float = 5.0
    reconnect_delay: float = 1.0
    max_reconnect_delay: float = 30.0
    reconnect_backoff: float = 2.0
    ipv6: bool = True
    queue_capacity: int = 4096
    """Batches of one pod waiting for the index; beyond it live batches are dropped,
    counted, and fetched again by replay once the queue has drained to half."""
    idle_probe_interval: float = 5.0
    """After this long without a live batch, ask the publisher for what follows the last
    applied batch: catches a lost final batch and a restarted idle engine. 0 disables."""
    rcvhwm: int = 100_000
    hold_capacity: int = 100_000
    """Live batches held while a replay is answered; more are dropped and replayed later."""
    curve: CurveClient | None = None
    """CURVE keys for both sockets (:mod:`edgellm.comm.curve`): this subscriber's keypair and
    the publishers' public key. None: plain tcp, as vLLM publishes."""

    def __post_init__(self) -> None:
        for name in ("poll_timeout", "replay_timeout", "reconnect_delay", "max_reconnect_delay"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.reconnect_backoff < 1:
            raise ValueError("reconnect_backoff must be >= 1")
        if self.max_reconnect_delay < self.reconnect_delay:
            raise ValueError("max_reconnect_delay must be >= reconnect_delay")
        if self.queue_capacity < 2 or self.hold_capacity < 1:
            raise ValueError("queue_capacity must be >= 2 and hold_capacity >= 1")
        if self.idle_probe_interval < 0 or self.rcvhwm < 0:
            raise ValueError("idle_probe_interval and rcvhwm must be >= 0")


@dataclass(frozen=True)
class ManagerConfig:
    """How the manager runs; ``enabled=False`` makes start/pod events no-ops (AIBrix)."""

    enabled: bool = True
    index_ready_timeout: float = 30.0
    index_ready_poll: float = 1.0
    subscriber: SubscriberConfig = field(default_factory=SubscriberConfig)

    def __post_init__(self) -> None:
        if self.index_ready_timeout < 0 or self.index_ready_poll <= 0:
            raise ValueError("index_ready_timeout must be >= 0 and index_ready_poll > 0")

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: object
    ) -> "ManagerConfig":
        """Enabled iff both AIBrix switches are ``true`` in ``env`` (default os.environ)."""
        env = os.environ if env is None else env
        enabled = env_flag(env, ENV_SYNC_ENABLED) and env_flag(env, ENV_REMOTE_TOKENIZER)
        return cls(enabled=enabled, **overrides)  # type: ignore[arg-type]
