"""50,000 fuzzed payloads (bench/fuzz_events.py runs 1,000,000), malformed frames and
bogus seqs, valid batches around them, through real sockets into the memory index."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "bench")))

from _fuzz import run  # noqa: E402


@pytest.mark.slow
def test_fuzzed_traffic_is_counted_exactly_and_harms_nothing():
    out = run(50_000, seed=7)
    assert out["crashes"] == 0 and out["hangs"] == 0, out
    assert out["payloads"] >= 50_000 and out["decode_errors"] == out["payloads"], out
    assert out["protocol_errors"] == out["malformed_frames"] > 0, out
    assert out["invalid_events"] == out["invalid_event_batches"] > 0, out
    assert out["stale_batches"] == out["bogus_seq_frames"] > 0, out
    assert out["events_processed"] == out["events_sent"] and out["resyncs"] == 0, out
    assert out["index_blocks"] == out["truth_blocks"] > 0 and out["chains_wrong"] == 0, out
    assert out["checkpoints_wrong"] == 0 and out["ok"], out
