"""Load a model for the engine: a Hugging Face directory, or a GGUF file converted once.

A GGUF file (quantised weights, tokenizer and chat template in one file) is dequantised by
transformers and saved with ``save_pretrained`` into the cache (:mod:`edgellm.models.cache`:
keyed by the file's sha256 and the transformers version), so later starts load the
converted copy in a fraction of a second instead of converting again (~15 s for the default
model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from edgellm.engine import kv_cache
from edgellm.models import cache
from edgellm.models.catalog import ModelSource
from edgellm.models.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded or served (the message says why)."""


@dataclass
class LoadedModel:
    source: ModelSource
    model: torch.nn.Module
    tokenizer: Tokenizer
    model_dir: str
    eos_token_ids: frozenset[int]
    max_position_embeddings: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


def load(source: ModelSource, dtype: str = "float32", cache_root: str | None = None) -> LoadedModel:
    """Load ``source`` with paged attention; :class:`ModelLoadError` if it cannot be served."""
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = load_tokenizer(source, cache_root=cache_root)
        if source.is_gguf:
            directory = cache.converted_dir(source.path, cache_root)
            model_dir = cache.ensure_part(directory, "model", lambda tmp: _convert(source, tmp))
        else:
            model_dir = source.path
        kv_cache.register()
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=TORCH_DTYPES[dtype], attn_implementation=kv_cache.ATTENTION_NAME
        )
    except Exception as exc:  # transformers, safetensors, gguf... each raise their own kinds
        raise ModelLoadError(f"cannot load model {source.name} from {source.path}: "
                             f"{type(exc).__name__}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    eos: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), config.eos_token_id):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(v for v in value if isinstance(v, int))
    max_pos = getattr(config, "max_position_embeddings", None) or 2048
    log.info("model %s loaded from %s (%s, %d layers, %d KV heads x %d)", source.name, model_dir,
             dtype, config.num_hidden_layers, kv_heads, head_dim)  # fmt: skip
    return LoadedModel(source, model, tokenizer, model_dir, frozenset(eos), int(max_pos),
                       config.num_hidden_layers, kv_heads, head_dim)  # fmt: skip


def _convert(source: ModelSource, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    log.info("converting %s once (GGUF -> %s)", source.path, out_dir)
    model = AutoModelForCausalLM.from_pretrained(
        source.directory, gguf_file=source.gguf_file, dtype=torch.float32
    )
    model.save_pretrained(out_dir)
