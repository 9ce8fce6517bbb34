"""edgellm.kvindex: prefix hashing, the prefix index (memory or Redis) and the router.

``create_index(config)`` gives the backend the configuration names: Redis/Valkey when
``config.redis_url`` is set (``EDGELLM_KVINDEX_REDIS_URL``), the in-memory index otherwise.
"""

from __future__ import annotations

from edgellm.kvindex.api import PrefixIndex
from edgellm.kvindex.config import IndexConfig

__all__ = ["create_index"]


def create_index(config: IndexConfig | None = None) -> PrefixIndex:
    """A new index for ``config`` (default: ``IndexConfig.from_env()``)."""
    config = config if config is not None else IndexConfig.from_env()
    if config.redis_url:
        from edgellm.kvindex.redis_index import RedisPrefixIndex

        return RedisPrefixIndex(config)
    from edgellm.kvindex.memory import MemoryPrefixIndex

    return MemoryPrefixIndex(config)
