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


# --- the tiny model (llm engine and unit tests) -----------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with an offline-trained tokenizer (see ``tests/tiny_llm.py``)."""
    pytest.importorskip("torch")
    from tiny_llm import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from edgellm.models.catalog import ModelSource

    return ModelSource("tiny-llama", tiny_model_dir)
