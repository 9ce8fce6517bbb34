"""Shared fixtures: a runtime dir, raw ZeroMQ peers that are always closed, free ports
from the socket that binds them, a check that a test left no endpoint of ours open, and a
real redis-server.

Raw peers (``sockets``) stand for the other side of the wire (a C++ node, vLLM): tests
speak to the code under test through them, never through the code under test itself.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import zmq
from redis_server import RedisServer, find_redis_server

from edgellm.comm.endpoints import context, open_endpoints


@pytest.fixture
def runtime_dir():
    """A private directory for ``rpc.*`` and unit sockets, short (ipc paths are limited to
    ~107 bytes) and removed afterwards."""
    path = tempfile.mkdtemp(prefix="el-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sockets():
    """``sockets(zmq.REQ)``: a raw socket of the process's context with linger 0, closed
    at teardown whatever the test did."""
    made: list[zmq.Socket] = []

    def new(kind: int) -> zmq.Socket:
        sock = context().socket(kind)
        sock.linger = 0
        made.append(sock)
        return sock

    yield new
    for sock in made:
        sock.close(linger=0)


@pytest.fixture
def bound(sockets):
    """``bound(zmq.PUB)`` -> ``(socket, port)``: bound to a loopback port the socket
    layer picked while binding (never a port found free and bound again later)."""

    def bind(kind: int, interface: str = "tcp://127.0.0.1") -> tuple[zmq.Socket, int]:
        sock = sockets(kind)
        return sock, sock.bind_to_random_port(interface)

    return bind


@pytest.fixture
def no_endpoint_left():
    """Fails the test if an endpoint opened during it is still open at its end: the code
    under test closes what it opens (every endpoint, every socket thread's)."""
    before = set(open_endpoints())
    yield
    left = [e for e in open_endpoints() if e not in before]
    assert not left, f"{len(left)} endpoint(s) left open: {left}"


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
