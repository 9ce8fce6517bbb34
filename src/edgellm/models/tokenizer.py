"""A model's tokenizer without transformers at run time: ``tokenizers`` + the chat template.

:class:`Tokenizer` reads a tokenizer directory as transformers writes it (``tokenizer.json``,
``tokenizer_config.json``, optionally ``chat_template.jinja``) and reproduces what
transformers' fast tokenizers do with it:

- :meth:`Tokenizer.encode` = ``tokenizer(text).input_ids`` (special tokens added by the
  tokenizer's own post-processor, as transformers saved it);
- :meth:`Tokenizer.render_chat` = ``apply_chat_template(messages, tokenize=False,
  add_generation_prompt=...)``: the same Jinja environment (sandboxed, ``trim_blocks``,
  ``lstrip_blocks``, loop controls, ``tojson``, ``raise_exception``, ``strftime_now``) and the
  same variables (the messages and the special tokens by name);
- :meth:`Tokenizer.encode_chat` = the rendered text encoded without adding special tokens
  (the template writes them), as ``apply_chat_template(tokenize=True)`` does.

The gateway and the engine both tokenise through this class, so a request's token ids are
the same on both sides of the wire (tests compare them with transformers' own, too).

:func:`load_tokenizer` takes a :class:`~edgellm.models.catalog.ModelSource`; a GGUF source's
tokenizer is converted once by transformers (no PyTorch needed) into the cache.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend
from tokenizers.decoders import DecodeStream

from edgellm.models import cache
from edgellm.models.catalog import ModelSource

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")  # fmt: skip
ROLES = ("system", "user", "assistant", "tool", "developer")


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used, or messages its template cannot render."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` (transformers' assistant-mask tag): renders
    its body; templates that use it must still parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: no HTML escaping, options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"chat template does not compile: {exc}") from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]  # an AddedToken as transformers serialises it
    return None


class Tokenizer:
    """Encode, decode and render chats like the model's transformers tokenizer (thread-safe
    for concurrent use: the backend and the compiled template hold no per-call state)."""

    def __init__(self, backend: _Backend, config: Mapping[str, Any], chat_template: str | None,
                 name: str = ""):  # fmt: skip
        self.name = name
        self._backend = backend
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            text = _token_text(config.get(key))
            if text is not None:
                self.special_tokens[key] = text
        extra = config.get("additional_special_tokens")
        if isinstance(extra, list):
            texts = [t for t in map(_token_text, extra) if t is not None]
            if texts:
                self.special_tokens["additional_special_tokens"] = texts  # type: ignore[assignment]
        self.chat_template = chat_template
        self._template = _compile(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, path: str, name: str = "") -> "Tokenizer":
        """Read a tokenizer directory; :class:`TokenizerError` if it has no ``tokenizer.json``."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise TokenizerError(f"no tokenizer.json in {path}")
        try:
            backend = _Backend.from_file(tok_file)
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"unreadable {tok_file}: {exc}") from None
        config: dict[str, Any] = {}
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as fh:
                config = json.load(fh)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as fh:
                template = fh.read()
        return cls(backend, config, template if isinstance(template, str) else None, name)

    # -- ids -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self._backend.token_to_id(text)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chats -----------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True) -> str:  # fmt: skip
        """The chat template applied to ``messages`` (``[{"role", "content"}, ...]``).

        Raises :class:`TokenizerError` when the model has no chat template, the messages are
        malformed, or the template refuses them (its ``raise_exception``)."""
        if self._template is None:
            raise TokenizerError(f"model {self.name or '?'} has no chat template")
        checked = check_messages(messages)
        try:
            return self._template.render(
                messages=checked, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens,
            )  # fmt: skip
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template refused the messages: {exc}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True) -> list[int]:  # fmt: skip
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self, *, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self._backend, skip_special_tokens)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as plain ``{"role", "content"}`` dicts; :class:`TokenizerError` if they are
    not a non-empty list of objects with a known role and string content."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise TokenizerError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TokenizerError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


class IncrementalDetokenizer:
    """Text of a growing token sequence, one token at a time, never a broken character:
    :meth:`push` returns the new text a token completes ("" while a multi-byte character or
    a merge is still incomplete)."""

    def __init__(self, backend: _Backend, skip_special_tokens: bool = True):
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)


def load_tokenizer(source: ModelSource, *, cache_root: str | None = None) -> Tokenizer:
    """The tokenizer of ``source``: its directory, or for a GGUF file the converted copy in
    the cache (converted now, by transformers, if missing)."""
    if not source.is_gguf:
        return Tokenizer.from_dir(source.path, source.name)
    directory = cache.converted_dir(source.path, cache_root)
    part = cache.ensure_part(directory, "tokenizer", lambda tmp: _convert_gguf_tokenizer(source, tmp))
    return Tokenizer.from_dir(part, source.name)


def _convert_gguf_tokenizer(source: ModelSource, out_dir: str) -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # only on a cache miss
    from transformers import AutoTokenizer

    # transformers refuses to open a GGUF file without PyTorch, though reading its metadata
    # (the tokenizer and config; no tensors) never touches it: the gateway converts the
    # tokenizer on hosts without PyTorch (the output is byte-identical either way).
    guard = gguf_utils.is_torch_available
    gguf_utils.is_torch_available = lambda: True
    try:
        tok = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    finally:
        gguf_utils.is_torch_available = guard
    tok.save_pretrained(out_dir)


__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerError", "check_messages",
           "load_tokenizer"]  # fmt: skip
