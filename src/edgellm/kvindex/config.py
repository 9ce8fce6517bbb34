"""Configuration of a prefix index: one frozen, validated object, loadable from env vars.

The limits keep AIBrix's names and defaults (``pkg/utils/syncprefixcacheindexer``):

==========================================  =======  ======================================
env var                                      default  meaning
==========================================  =======  ======================================
``AIBRIX_SYNC_MAX_CONTEXTS``                 1000     contexts (model, LoRA) kept
``AIBRIX_SYNC_MAX_PREFIXES_PER_CONTEXT``     10000    distinct prefix hashes per context
``AIBRIX_SYNC_EVICTION_INTERVAL_SECONDS``    60       how often idle contexts are looked for
``AIBRIX_SYNC_EVICTION_DURATION_MINUTES``    20       a context idle this long is dropped
``AIBRIX_PREFIX_CACHE_BLOCK_SIZE``           16       block size for prompts of a context no
                                                      engine has reported on yet
``EDGELLM_KVINDEX_MAX_BLOCKS``               2000000  memory budget: (pod, block) holdings
``EDGELLM_KVINDEX_HASH_SEED``                golden   seed of the prefix hash chain (must be
                                                      equal on replicas sharing an index)
``EDGELLM_KVINDEX_REDIS_URL``                 -        ``redis://`` URL of a shared index
==========================================  =======  ======================================

The memory budget is in holdings because that is what costs memory (about 150 bytes each in
the in-memory backend, see ``bench/lookup.py``): 2,000,000 is ~300 MB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from edgellm.kvindex.hashing import DEFAULT_SEED

__all__ = ["IndexConfig"]


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """Limits and hashing parameters shared by every backend."""

    max_contexts: int = 1000
    max_prefixes_per_context: int = 10_000
    eviction_interval_s: float = 60.0
    idle_eviction_s: float = 20 * 60.0
    block_size: int = 16
    max_blocks: int = 2_000_000
    seed: int = DEFAULT_SEED
    redis_url: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_contexts", "max_prefixes_per_context", "block_size", "max_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eviction_interval_s", "idle_eviction_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError("seed must be an unsigned 64-bit int")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> "IndexConfig":
        """Read the env vars above (``os.environ`` by default); ``overrides`` win.

        Raises ``ValueError`` naming the variable for a malformed value.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}

        def read(var: str, field: str, conv) -> None:
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                return
            try:
                values[field] = conv(raw.strip())
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not valid") from None

        read("AIBRIX_SYNC_MAX_CONTEXTS", "max_contexts", int)
        read("AIBRIX_SYNC_MAX_PREFIXES_PER_CONTEXT", "max_prefixes_per_context", int)
        read("AIBRIX_SYNC_EVICTION_INTERVAL_SECONDS", "eviction_interval_s", float)
        read("AIBRIX_SYNC_EVICTION_DURATION_MINUTES", "idle_eviction_s", lambda s: 60.0 * float(s))
        read("AIBRIX_PREFIX_CACHE_BLOCK_SIZE", "block_size", int)
        read("EDGELLM_KVINDEX_MAX_BLOCKS", "max_blocks", int)
        read("EDGELLM_KVINDEX_HASH_SEED", "seed", lambda s: int(s, 0))
        read("EDGELLM_KVINDEX_REDIS_URL", "redis_url", str)
        values.update(overrides)
        return cls(**values)  # validated in __post_init__
