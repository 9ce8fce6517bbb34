"""The real default model (SmolLM2-135M-Instruct, from its wheel, converted once): it answers,
and its greedy tokens equal transformers' ``generate`` cold, warm and batched."""

from __future__ import annotations

import pytest
import torch

from edgellm.engine import EngineConfig, LLMEngine, SamplingParams
from edgellm.models import ModelNotFound, default_model

from conftest import greedy_reference, text_of, tokens_of

SYSTEM = ("You are a concise assistant for an edge box. You answer in one or two sentences, "
          "you never invent facts, and you say so when you do not know. ") * 4  # fmt: skip
QUESTIONS = ["What is the capital of France?", "Name three primary colours.",
             "Write one sentence about the sea."]  # fmt: skip


@pytest.fixture(scope="module")
def smollm():
    try:
        source = default_model()
    except ModelNotFound as exc:
        pytest.fail(f"the default model must be installed by make setup: {exc}")
    with LLMEngine(source, EngineConfig(kv_cache_bytes=64 << 20, prefill_chunk=64)) as engine:
        yield engine


def test_it_knows_the_capital_of_france(smollm):
    ids = smollm.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    outs = smollm.generate([ids], SamplingParams(max_tokens=40, temperature=0), timeout=120)[0]
    assert "Paris" in text_of(outs)
    assert outs[-1].finish_reason == "stop"  # <|im_end|>, the model's end of turn


def test_greedy_equals_generate_cold_warm_and_batched(smollm):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(smollm.loaded.model_dir, dtype=torch.float32).eval()
    prompts = [smollm.tokenizer.encode_chat([{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": q}]) for q in QUESTIONS]  # fmt: skip
    expected = [greedy_reference(reference, p, 64) for p in prompts]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    cold = smollm.generate(prompts[:1], params, timeout=120)[0]
    assert tokens_of(cold) == expected[0]
    warm = smollm.generate(prompts[1:2], params, timeout=120)[0]  # shares the system prompt
    assert warm[-1].cached_tokens >= len(smollm.tokenizer.encode(SYSTEM)) // 16 * 16 - 16
    assert tokens_of(warm) == expected[1]
    batched = smollm.generate(prompts, params, timeout=300)
    for i, outs in enumerate(batched):
        assert tokens_of(outs) == expected[i], f"prompt {i}"
