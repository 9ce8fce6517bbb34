"""Shared helpers of the kvindex benches: cheap deterministic token blocks and timing."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

BLOCK = 16
VOCAB = 128_000


def chain_tokens(chain_id: int, n_blocks: int, block_size: int = BLOCK) -> list[int]:
    """Tokens of a chain: its first block carries ``chain_id`` so chains never share a prefix;
    ids spread over a real vocabulary's range (most above 256: no cached small ints)."""
    base = (chain_id * 7919) % (VOCAB - block_size * n_blocks - 1) + 300
    tokens = list(range(base, base + block_size * n_blocks))
    tokens[0] = chain_id & 0xFFFFFFFF
    return tokens


def percentiles_us(samples_ns: Sequence[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)
    return {
        "p50_us": round(ordered[n // 2] / 1000, 1),
        "p99_us": round(ordered[min(n - 1, (n * 99) // 100)] / 1000, 1),
        "max_us": round(ordered[-1] / 1000, 1),
        "mean_us": round(statistics.fmean(ordered) / 1000, 1),
    }


def time_calls(fn: Callable[[], object], n: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return samples


def rounds_us(fn: Callable[[], object], n: int, rounds: int = 5) -> dict[str, float]:
    """Percentiles of ``n`` timed calls made in ``rounds`` rounds, plus the best round's p99.

    On a shared 2-core box a lookup is now and then preempted for a scheduler slice
    (~4 ms); the best round shows the code's own tail, the overall figures show the box's.
    """
    per_round = max(1, n // rounds)
    samples: list[int] = []
    best = float("inf")
    for _ in range(rounds):
        batch = time_calls(fn, per_round)
        samples.extend(batch)
        best = min(best, percentiles_us(batch)["p99_us"])
    out = percentiles_us(samples)
    out["p99_best_round_us"] = best
    return out
