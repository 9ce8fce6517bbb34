"""Configuration of a prefix index: one frozen, validated object, loadable from env vars.

The limits keep AIBrix's env names (``pkg/utils/syncprefixcacheindexer``); the defaults of
the two block limits are this index's own, chosen to work together:

==========================================  =========  ====================================
env var                                      default    meaning
==========================================  =========  ====================================
``AIBRIX_SYNC_MAX_CONTEXTS``                 1000       contexts (model, LoRA) kept
``AIBRIX_SYNC_MAX_PREFIXES_PER_CONTEXT``     =budget    distinct prefix hashes per context
``AIBRIX_SYNC_EVICTION_INTERVAL_SECONDS``    60         how often idle contexts are looked for
``AIBRIX_SYNC_EVICTION_DURATION_MINUTES``    20         a context idle this long is dropped
``AIBRIX_PREFIX_CACHE_BLOCK_SIZE``           16         block size of a BlockStored that names
                                                        none (``block_size=None``)
``EDGELLM_KVINDEX_MAX_BLOCKS``               1000000    memory budget: (pod, block) holdings
``EDGELLM_KVINDEX_HASH_SEED``                golden     seed of the prefix hash chain (must be
                                                        equal on replicas sharing an index)
``EDGELLM_KVINDEX_REDIS_URL``                 -          ``redis://`` URL of a shared index
                                                        (one server, or any node of a
                                                        Redis Cluster)
``EDGELLM_KVINDEX_REDIS_PLACEMENT``          context    Redis Cluster: one slot per
                                                        ``context``, or contexts split by
                                                        ``pod`` (``redis_keys.py``)
``EDGELLM_KVINDEX_REDIS_POD_GROUPS``         12         shards per context, ``pod`` placement
==========================================  =========  ====================================

Why these defaults: AIBrix's 10,000 prefixes per context is 160k tokens of 16-token blocks,
about twenty 8k-token prompts: a pool of engines holds far more, so a cache-aware router
with that limit forgets most of what the engines hold (``bench/route_sim.py`` falls from
~0.84 to ~0.55 hit rate). The per-context limit therefore defaults to the block budget
(``max_prefixes_per_context=None``): it only binds when set lower, to keep one model from
crowding out the others. The budget is in
holdings because that is what costs memory (``bench/lookup.py`` measures bytes per block
in RSS): 1,000,000 is a few hundred MB, enough for 64 engines of ~15,000 blocks each.

Both limits evict in batches: once over a limit, least-recently-used blocks go until the
count is at the limit's :func:`low_watermark` (1/64 below it), so a long-running router at
its budget pays for an eviction pass once per ~1.5% of the budget, not on every store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from edgellm.kvindex.hashing import DEFAULT_SEED

__all__ = ["IndexConfig", "low_watermark"]


def low_watermark(limit: int) -> int:
    """Where eviction stops once ``limit`` is exceeded: 1/64 below it (``limit`` itself
    for limits under 64, so small limits are exact)."""
    return limit - limit // 64


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """Limits and hashing parameters shared by every backend."""

    max_contexts: int = 1000
    max_prefixes_per_context: int | None = None  # None: max_blocks
    eviction_interval_s: float = 60.0
    idle_eviction_s: float = 20 * 60.0
    block_size: int = 16
    max_blocks: int = 1_000_000
    seed: int = DEFAULT_SEED
    redis_url: str | None = None
    redis_placement: str = "context"
    redis_pod_groups: int = 12

    def __post_init__(self) -> None:
        if self.max_prefixes_per_context is None:
            object.__setattr__(self, "max_prefixes_per_context", self.max_blocks)
        if self.redis_placement not in ("context", "pod"):
            raise ValueError(f"redis_placement must be 'context' or 'pod', "
                             f"got {self.redis_placement!r}")
        for name in ("max_contexts", "max_prefixes_per_context", "block_size", "max_blocks",
                     "redis_pod_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eviction_interval_s", "idle_eviction_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed < 1 << 64:
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
        read("EDGELLM_KVINDEX_REDIS_PLACEMENT", "redis_placement", str)
        read("EDGELLM_KVINDEX_REDIS_POD_GROUPS", "redis_pod_groups", int)
        values.update(overrides)
        return cls(**values)  # validated in __post_init__
