"""50,000 fuzzed payloads (bench/fuzz_events.py runs 1,000,000), malformed frames and
bogus seqs, valid batches around them, through real sockets into the memory index; and
10,000 into the Redis index (the apply thread's grouped path, on a real redis-server)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "bench")))

from _fuzz import run  # noqa: E402


def _check(out: dict, payloads: int) -> None:
    assert out["crashes"] == 0 and out["hangs"] == 0, out
    assert out["payloads"] >= payloads and out["decode_errors"] == out["payloads"], out
    assert out["protocol_errors"] == out["malformed_frames"] > 0, out
    assert out["invalid_events"] == out["invalid_event_batches"] > 0, out
    assert out["stale_batches"] == out["bogus_seq_frames"] > 0, out
    assert out["events_processed"] == out["events_sent"] and out["resyncs"] == 0, out
    assert out["index_blocks"] == out["truth_blocks"] > 0 and out["chains_wrong"] == 0, out
    assert out["checkpoints_wrong"] == 0 and out["ok"], out


@pytest.mark.slow
def test_fuzzed_traffic_is_counted_exactly_and_harms_nothing():
    _check(run(50_000, seed=7), 50_000)


@pytest.mark.slow
@pytest.mark.redis
def test_fuzzed_traffic_into_redis(redis_server):
    import uuid

    from edgellm.kvindex.redis_index import RedisPrefixIndex

    _check(run(10_000, seed=11, make_index=lambda config: RedisPrefixIndex(
        config, url=redis_server.url, namespace=f"t:{uuid.uuid4().hex}")), 10_000)
