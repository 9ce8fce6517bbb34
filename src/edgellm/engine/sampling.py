"""What a request asks of generation: how to pick tokens and when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class SamplingError(ValueError):
    """A sampling parameter out of range (the message names it)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, validated on construction.

    - ``max_tokens``: tokens to generate at most (>= 1); the context limit may stop it first.
    - ``temperature``: 0 picks the most likely token (greedy); otherwise logits are divided
      by it before sampling.
    - ``top_p`` (0 < p <= 1) and ``top_k`` (0 = off): keep the smallest set of most likely
      tokens whose probability reaches ``top_p``, and at most ``top_k`` of them.
    - ``seed``: the request's own random stream (same seed, same prompt, same settings: the
      same tokens); None draws from the engine's stream.
    - ``stop``: strings that end generation; the text returned stops before them, also when
      a stop string spans several tokens.
    - ``stop_token_ids``: extra token ids that end generation (the model's end-of-sequence
      tokens always do, unless ``ignore_eos``).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _number(self.temperature) or not 0 <= self.temperature <= 100:
            raise SamplingError(f"temperature must be a number in 0..100, got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
            or not -(1 << 63) <= self.seed < (1 << 64)
        ):
            raise SamplingError(f"seed must be a 64-bit integer, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise SamplingError("stop must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (tuple, list)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
        ):
            raise SamplingError("stop_token_ids must be a list of token ids")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError("ignore_eos must be a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))  # fmt: skip
