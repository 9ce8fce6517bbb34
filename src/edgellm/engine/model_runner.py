"""One forward pass of the model over a step's tokens, with the paged KV cache.

The step's tokens of every request are packed into one sequence (no padding); positions
restart per request, so the rotary embeddings see each request's own positions; attention
keeps requests apart (:mod:`edgellm.engine.kv_cache`). Logits are computed only at the last
token of the requests that need a next token.

Two paths compute the same thing: :class:`~edgellm.engine.fast_forward.FastForward` for the
Llama family, transformers' own module forward (with the paged attention in its attention
interface) for every other architecture.
"""

from __future__ import annotations

from typing import Sequence

import torch

from edgellm.engine import fast_forward
from edgellm.engine.kv_cache import KVCache, StepLayout
from edgellm.engine.loader import LoadedModel, ModelLoadError
from edgellm.engine.request import Request


class ModelRunner:
    """Runs :attr:`loaded`'s model over a :class:`KVCache` (engine thread only).

    ``fast`` None picks the lean path when the architecture allows it; False forces
    transformers' forward (tests compare the two)."""

    def __init__(self, loaded: LoadedModel, cache: KVCache, fast: bool | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.cache = cache
        use_fast = fast_forward.supports(self.model) if fast is None else fast
        self.fast = fast_forward.FastForward(self.model) if use_fast else None

    @property
    def path(self) -> str:
        return "fast" if self.fast is not None else "transformers"

    @torch.inference_mode()
    def forward(self, requests: Sequence[Request], num_new: Sequence[int],
                sample_rows: Sequence[int]) -> torch.Tensor:  # fmt: skip
        """Compute ``num_new[i]`` tokens of ``requests[i]`` (from its ``num_computed``), and
        return float32 logits ``[len(sample_rows), vocab]`` at the last computed token of the
        requests at those indices."""
        ids: list[int] = []
        positions: list[int] = []
        last: list[int] = []
        for request, n in zip(requests, num_new):
            start = request.num_computed
            ids.extend(request.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            last.append(len(ids) - 1)
        layout = StepLayout(
            self.cache,
            [[b.block_id for b in r.blocks] for r in requests],
            [r.num_computed + n for r, n in zip(requests, num_new)],
            num_new,
        )
        keep = torch.tensor([last[i] for i in sample_rows], dtype=torch.long)
        input_ids = torch.tensor(ids, dtype=torch.long)
        position_ids = torch.tensor(positions, dtype=torch.long)
        if self.fast is not None:
            logits = self.fast(input_ids, position_ids, layout, keep)
        else:
            out = self.model(
                input_ids=input_ids.unsqueeze(0), position_ids=position_ids.unsqueeze(0),
                use_cache=False, logits_to_keep=keep, edgellm_step=layout,
            )  # fmt: skip
            logits = out.logits[0].float()
        if layout.layers_seen != self.loaded.num_layers:
            raise ModelLoadError(
                f"{type(self.model).__name__} ran {layout.layers_seen} of "
                f"{self.loaded.num_layers} layers through the paged attention: this "
                f"architecture does not use transformers' attention interface"
            )
        return logits
