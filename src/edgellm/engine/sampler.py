"""Pick each request's next token from its logits (greedy, or temperature / top-k / top-p)."""

from __future__ import annotations

from typing import Sequence

import torch

from edgellm.engine.sampling import SamplingParams


def generator_for(seed: int | None, fallback: torch.Generator) -> torch.Generator:
    """A request's own random stream (seeded), or the engine's shared one."""
    if seed is None:
        return fallback
    return torch.Generator().manual_seed(seed % (1 << 63))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator]) -> list[int]:  # fmt: skip
    """One token per row of ``logits`` ``[n, vocab]`` (float32)."""
    out = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        picks = logits[greedy].argmax(dim=-1).tolist()
        for i, token in zip(greedy, picks):
            out[i] = token
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if 0 < p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token once the ones before it already reach top_p (the first always stays).
            drop = (probs.cumsum(dim=-1) - probs) >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            row = torch.empty_like(row).scatter_(0, order, sorted_logits)
        probs = torch.softmax(row, dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
