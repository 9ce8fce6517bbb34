"""Work ids, the port pool, connection ids, the key/value store."""

from __future__ import annotations

import pytest

from edgellm.manager.allocator import ConnectionIds, PoolExhausted, PortPool, WorkIdCounter
from edgellm.manager.store import KeyValueStore


def test_work_ids_count_up_from_the_configured_first():
    counter = WorkIdCounter(1000)
    assert [counter.next() for _ in range(3)] == [1000, 1001, 1002]


def test_port_pool_lowest_free_first_and_reuse_after_release():
    pool = PortPool(5010, 5014)
    assert [pool.take() for _ in range(4)] == [5010, 5011, 5012, 5013]
    with pytest.raises(PoolExhausted):
        pool.take()
    pool.give_back(5011)
    pool.give_back(5011)  # twice: no duplicate
    pool.give_back(9999)  # foreign: ignored
    assert pool.available == 1
    assert pool.take() == 5011


def test_connection_ids_wrap_after_65535_and_skip_ids_in_use():
    ids = ConnectionIds(first=8000, last=8002)
    assert [ids.take(), ids.take(), ids.take()] == [8000, 8001, 8002]
    with pytest.raises(PoolExhausted):
        ids.take()
    ids.give_back(8001)
    assert ids.take() == 8001
    ids.give_back(8000)
    assert ids.take() == 8000
    default = ConnectionIds()
    assert (default.first, default.last) == (8000, 65535)


def test_store_reads_missing_keys_as_empty():
    store = KeyValueStore({"a": "1"})
    assert store.select("a") == "1" and store.select("b") == ""
    store.set("b", "2")
    store.unset("a")
    store.unset("never")
    assert dict((k, store.select(k)) for k in store) == {"b": "2"}
    with pytest.raises(ValueError):
        store.set("", "x")
