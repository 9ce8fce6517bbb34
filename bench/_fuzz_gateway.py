"""Fuzz target of the gateway's request parsing (``bench/_fuzz_targets.py`` lists them all).

Byte 0 picks the body model (chat, completion, tokenize, detokenize); the rest is the body.
Everything a handler does with a body before it reaches an engine must raise only
:class:`APIError` with a 4xx status: ``schemas.parse``, ``refuse_unsupported``, the
generation request the handlers build, the chat messages, and the tokenizer a gateway with
``--tokenizer`` runs (the tests' tiny model's, no weights); an accepted body parses again
from its own dump and encodes as the JSON an HTTP engine is sent. A JSON-aware mutator
(:func:`~_fuzz_targets.mutate_tree`) takes the search past the syntax.
"""

from __future__ import annotations

import json
import random
import tempfile

from _fuzz_targets import Target, mutate_tree


class GatewayTarget(Target):
    """Byte 0 picks the body model (chat, completion, tokenize, detokenize)."""

    name = "gateway"
    max_len = 4096
    tokens = tuple(f'"{k}":'.encode() for k in (
        "model", "messages", "role", "content", "prompt", "stream", "stream_options",
        "include_usage", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
        "seed", "stop", "n", "best_of", "logprobs", "top_logprobs", "tools", "tool_choice",
        "response_format", "type", "text", "cache_salt", "ignore_eos", "tokens", "echo",
        "suffix", "presence_penalty", "logit_bias", "modalities", "audio", "name",
        "add_generation_prompt", "add_special_tokens", "function_call", "tool_calls",
    )) + (b'"user"', b'"system"', b'"developer"', b'"assistant"', b'"tool"', b"[[1,2]]",
          b"18446744073709551616", b"-1", b"1e309", b"true", b"null", b'"none"', b'["text"]')  # fmt: skip

    def load(self) -> None:
        import os
        import sys

        from edgellm.gateway import schemas
        from edgellm.gateway.app import _generation_request
        from edgellm.gateway.tokens import Tokenizers
        from edgellm.httpapi import APIError
        from edgellm.models.tokenizer import Tokenizer

        self.schemas, self.build, self.APIError = schemas, _generation_request, APIError
        # the tiny model's tokenizer (no weights): what a gateway with --tokenizer runs
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from tiny_llm import build_tiny_tokenizer

        self._dir = tempfile.TemporaryDirectory(prefix="el-fuzz-tok-")
        build_tiny_tokenizer(self._dir.name)
        self.tokenizer = Tokenizer.from_dir(self._dir.name, "m")
        self.tokenizers = Tokenizers({"m": self.tokenizer})
        self.models = (schemas.ChatCompletionRequest, schemas.CompletionRequest,
                       schemas.TokenizeRequest, schemas.DetokenizeRequest)  # fmt: skip

    def seeds(self) -> list[bytes]:
        bodies = [
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
             "stream_options": {"include_usage": True}, "max_tokens": 8, "temperature": 0,
             "stop": ["\n"], "cache_salt": "tenant-a", "seed": 1},
            {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "top_k": 5, "ignore_eos": True},
            {"model": "m", "messages": [{"role": "system", "content": [{"type": "text",
                                                                         "text": "x"}]}]},
            {"prompt": "hello"},
            {"tokens": [1, 2, 3]},
        ]  # fmt: skip
        return [bytes((i % 4,)) + json.dumps(b).encode() for i, b in enumerate(bodies)] + [
            b"\x01" + json.dumps(bodies[1]).encode(), b"\x02" + json.dumps(bodies[0]).encode()]

    def mutate(self, data: bytes, max_size: int, seed_value: int) -> bytes | None:
        rng = random.Random(seed_value)
        if not data or rng.random() < 0.3:
            return None
        try:
            value = json.loads(data[1:])
        except Exception:  # not JSON: byte-level mutation only
            return None
        words = tuple(t.decode()[1:-2] for t in self.tokens if t.endswith(b'":')) + (
            "user", "system", "assistant", "developer", "tool", "text", "image_url", "m", "none")
        header = bytes((rng.randrange(4),)) if rng.random() < 0.1 else data[:1]
        try:
            out = header + json.dumps(mutate_tree(value, rng, words, binary=False)).encode()
        except Exception:
            return None
        return out if len(out) <= max_size else None

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        s = self.schemas
        model = self.models[data[0] % 4]
        try:
            parsed = s.parse(data[1:], model)
            again = s.parse(parsed.model_dump_json(exclude_unset=True).encode(), model)
            assert again == parsed, "an accepted body does not parse from its own dump"
            if model is s.TokenizeRequest:
                self._tokenize(parsed)
            elif model is s.DetokenizeRequest:
                if all(t >= 0 for t in parsed.tokens):  # the handler's check
                    try:
                        self.tokenizer.decode(parsed.tokens)
                    except (ValueError, IndexError, OverflowError, TypeError):
                        pass  # the handler's 400
            else:
                s.refuse_unsupported(parsed)
                kind = "chat" if model is s.ChatCompletionRequest else "completion"
                gen = self.build(parsed, kind, "rid")
                assert gen.model == parsed.model
                assert gen.prompt is not None or gen.prompt_token_ids or gen.messages
                gen.model = "m"
                if gen.prompt_token_ids is None:
                    assert type(self.tokenizers.local_ids(gen)) is list
                json.dumps(gen.body, ensure_ascii=False).encode()  # what an HTTP engine gets
        except self.APIError as exc:
            assert 400 <= exc.status < 500 and exc.message, (exc.status, exc.message)


    def _tokenize(self, parsed) -> None:
        """What ``POST /tokenize`` does with a local tokenizer."""
        if (parsed.prompt is None) == (parsed.messages is None):
            return  # the handler's 400
        if parsed.messages is not None:
            messages = self.schemas.chat_messages(parsed.messages)
            try:
                self.tokenizer.encode_chat(messages,
                                           add_generation_prompt=parsed.add_generation_prompt is not False)
            except ValueError:
                pass  # the template refused them: the handler's 400
        else:
            self.tokenizer.encode(parsed.prompt, add_special_tokens=parsed.add_special_tokens is not False)
