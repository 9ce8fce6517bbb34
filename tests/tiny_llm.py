"""A tiny random Llama and a BPE tokenizer trained offline: a real model in milliseconds.

:func:`build_tiny_model` writes a Hugging Face model directory (2 layers, 64 dims, grouped
query attention: 4 query heads over 2 KV heads) with a byte-level BPE tokenizer trained by the
``tokenizers`` library on :data:`CORPUS`, a ChatML chat template (SmolLM2's), and
``<|im_end|>`` as end of sequence. The weights are random (seeded): outputs are nonsense, but
deterministic, and the engine's arithmetic is checked against transformers' on them.
"""

from __future__ import annotations

import os

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is the capital of France? Answer in one sentence.",
    "You are a helpful assistant. Answer briefly and politely.",
    "A block of sixteen tokens is cached once it is full; its hash chains on its parent.",
    "Edge boxes run small models on the CPU; the gateway routes to the box with the prefix.",
    "Ünïcödé text: naïve café, 日本語のテキスト, emoji 🎉🚀, Ελληνικά, русский текст.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation ! ? , . ; : - ( ) [ ] { }",
] * 20


def build_tiny_tokenizer(path: str, vocab_size: int = 512):
    """Write the tiny model's tokenizer (no weights, no PyTorch) into ``path`` (created);
    returns the ``tokenizers`` backend."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    tokenizer.save_pretrained(path)
    return backend


def build_tiny_model(path: str, seed: int = 0, vocab_size: int = 512,
                     max_position_embeddings: int = 1024) -> str:  # fmt: skip
    """Write the tiny model into ``path`` (created) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    backend = build_tiny_tokenizer(path, vocab_size)
    eos = backend.token_to_id("<|im_end|>")
    config = LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=backend.token_to_id("<|im_start|>"),
        eos_token_id=eos, pad_token_id=backend.token_to_id("<|endoftext|>"),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init: logits with a clear winner
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return path
