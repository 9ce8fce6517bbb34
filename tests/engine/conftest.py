"""Fixtures of the engine tests: a started engine on the tiny model, a transformers reference."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """transformers' own model and tokenizer for the tiny model (float32, eager sdpa)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model


def greedy_reference(model, prompt_ids, max_new_tokens):
    """transformers' ``generate``, greedy, not stopping at end of sequence (``min_new_tokens``
    would instead forbid the end token, which changes the choice)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    tokens = out[0, len(prompt_ids):].tolist()
    assert len(tokens) == max_new_tokens
    return tokens


def tokens_of(outputs):
    return [t for out in outputs for t in out.token_ids]


def text_of(outputs):
    return "".join(out.text for out in outputs)
