"""Shared fixtures."""

from __future__ import annotations

import pytest

# --- redis (kvindex): one real redis-server per session ------------------------------

from redis_server import RedisServer, find_redis_server


@pytest.fixture(scope="session")
def redis_server():
    """A running ``redis-server`` on a loopback port; skips only if the binary is missing."""
    if find_redis_server() is None:
        pytest.skip("redis-server binary not found (make test installs it)")
    with RedisServer() as server:
        yield server
