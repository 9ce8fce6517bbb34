"""A small routing simulation through the real event pipeline (bench/route_sim.py)."""

from __future__ import annotations

import os
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
sys.path.insert(0, os.path.abspath(BENCH))

from _sim import WorkloadConfig  # noqa: E402
from route_sim import run  # noqa: E402


def test_small_simulation() -> None:
    cfg = WorkloadConfig(conversations=40, system_prompts=3, window_s=40.0, seed=5)
    out = run(cfg, n_engines=4, capacity=3000)
    aware = out["policies"]["cache-aware"]
    # The index the pipeline built holds exactly what the engines' caches hold ...
    assert aware["index_blocks"] == aware["engine_blocks"] > 0
    assert aware["unknown_parent"] == 0
    assert aware["published"]["events"] > aware["published"]["batches"] > 0
    # ... so routing on it decides as routing on the caches themselves does.
    assert out["hit_rate"]["cache-aware"] == out["hit_rate"]["oracle"]
    assert out["hit_rate"]["cache-aware"] > 2 * out["hit_rate"]["round-robin"]
    assert out["hit_rate"]["cache-aware"] > 2 * out["hit_rate"]["random"]
    assert sum(aware["requests_per_engine"]) == sum(
        out["policies"]["round-robin"]["requests_per_engine"])
