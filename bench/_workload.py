"""Workloads and timing helpers of the kvindex benches.

- :func:`chain_tokens`: cheap deterministic token blocks (ingest, lookup);
- :class:`ChatWorkload` / :func:`make_conversations`: the seedable shared-prefix chat
  workload of the routing simulation (multi-turn chats on a few shared system prompts);
- :func:`rounds_us` and friends: latency percentiles.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ChatWorkload:
    """Chats on shared system prompts; every draw comes from ``seed``.

    Conversations start as a Poisson process of ``arrival_rate`` per second. Each picks one
    of ``system_prompts`` shared system prompts (Zipf popularity: the k-th is drawn with
    weight 1/k) and has ``turns`` turns; turn k's prompt is the system prompt, every earlier
    user message and reply, and the new user message. A reply's next turn comes after an
    exponential think time of mean ``think_s``. Ranges are inclusive, in tokens.
    """

    conversations: int = 400
    system_prompts: int = 8
    system_tokens: tuple[int, int] = (200, 600)
    turns: tuple[int, int] = (5, 12)
    user_tokens: tuple[int, int] = (50, 400)
    reply_tokens: tuple[int, int] = (150, 600)
    arrival_rate: float = 2.0
    think_s: float = 5.0
    seed: int = 1

    def __post_init__(self) -> None:
        if self.conversations < 1 or self.system_prompts < 1:
            raise ValueError("conversations and system_prompts must be >= 1")
        if not (self.arrival_rate > 0 and self.think_s > 0):
            raise ValueError("arrival_rate and think_s must be > 0")
        for name in ("system_tokens", "turns", "user_tokens", "reply_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be a range 1 <= low <= high")


@dataclass(frozen=True)
class Conversation:
    """One chat, fixed in advance (what the user says and what the model answers do not
    depend on where it is served; only when the turns happen does)."""

    start_s: float
    system_prompt: int
    """Which shared system prompt it starts with."""
    tokens: list[int]
    """The whole chat: system prompt, then each turn's user message and reply."""
    prompt_ends: tuple[int, ...]
    """Turn k's prompt is ``tokens[:prompt_ends[k]]`` ..."""
    reply_ends: tuple[int, ...]
    """... and its reply ``tokens[prompt_ends[k]:reply_ends[k]]``."""
    think_s: tuple[float, ...]
    """Time from turn k's reply to turn k+1's prompt."""

    @property
    def turns(self) -> int:
        return len(self.prompt_ends)


def make_conversations(workload: ChatWorkload) -> list[Conversation]:
    """The conversations of ``workload``, in start order; equal workloads give equal lists."""
    rng = random.Random(workload.seed)
    vocab = range(300, VOCAB)
    systems = [rng.choices(vocab, k=rng.randint(*workload.system_tokens))
               for _ in range(workload.system_prompts)]
    popularity = [1 / (k + 1) for k in range(workload.system_prompts)]
    out = []
    start = 0.0
    for _ in range(workload.conversations):
        start += rng.expovariate(workload.arrival_rate)
        system = rng.choices(range(workload.system_prompts), popularity)[0]
        tokens = list(systems[system])
        prompt_ends, reply_ends = [], []
        for _ in range(rng.randint(*workload.turns)):
            tokens += rng.choices(vocab, k=rng.randint(*workload.user_tokens))
            prompt_ends.append(len(tokens))
            tokens += rng.choices(vocab, k=rng.randint(*workload.reply_tokens))
            reply_ends.append(len(tokens))
        think = tuple(rng.expovariate(1 / workload.think_s) for _ in prompt_ends)
        out.append(Conversation(start, system, tokens, tuple(prompt_ends), tuple(reply_ends),
                                think))
    return out


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
