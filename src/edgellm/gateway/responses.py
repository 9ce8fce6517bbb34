"""OpenAI's response objects and server-sent event chunks (vLLM's shapes).

A stream is ``data: <chunk JSON>\\n\\n`` events then ``data: [DONE]\\n\\n``. Chat streams open
with a chunk whose delta is ``{"role": "assistant", "content": ""}``, carry text deltas, and
close with a chunk holding ``finish_reason``; with ``stream_options.include_usage`` every
chunk has ``"usage": null`` and one last chunk has ``"choices": []`` and the usage. An error
after the stream began is one event ``data: {"error": {...}}`` and then ``[DONE]``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from edgellm.gateway.backend import Finished

_encode = msgspec.json.Encoder().encode
DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def usage(finished: Finished | None) -> dict[str, Any]:
    if finished is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    return {"prompt_tokens": finished.prompt_tokens,
            "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finished.cached_tokens or 0}}  # fmt: skip


class ResponseBuilder:
    """The objects of one response (one id, one ``created``), chat or completion."""

    def __init__(self, kind: str, model: str, include_usage: bool = False):
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    # -- whole responses -----------------------------------------------------------------

    def complete(self, text: str, finished: Finished) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text,
                                              "refusal": None, "tool_calls": []},
                      "logprobs": None, "finish_reason": finished.finish_reason}  # fmt: skip
            object_ = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": finished.finish_reason}  # fmt: skip
            object_ = "text_completion"
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(finished), "system_fingerprint": None}

    # -- stream chunks ---------------------------------------------------------------------

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        chunk = {"id": self.id, "object": self.object, "created": self.created,
                 "model": self.model, "choices": [choice]}  # fmt: skip
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def opening(self) -> bytes:
        """The first chunk of a chat stream (empty for completions)."""
        if self.kind != "chat":
            return b""
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None})  # fmt: skip

    def delta(self, text: str) -> bytes:
        if self.kind == "chat":
            return self._chunk({"index": 0, "delta": {"content": text}, "logprobs": None,
                                "finish_reason": None})  # fmt: skip
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": None})

    def closing(self, finished: Finished) -> bytes:
        """The chunk with ``finish_reason``, the usage chunk if asked for, ``[DONE]``."""
        if self.kind == "chat":
            last = self._chunk({"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": finished.finish_reason})  # fmt: skip
        else:
            last = self._chunk({"index": 0, "text": "", "logprobs": None,
                                "finish_reason": finished.finish_reason})  # fmt: skip
        if self.include_usage:
            last += sse({"id": self.id, "object": self.object, "created": self.created,
                         "model": self.model, "choices": [], "usage": usage(finished)})
        return last + DONE
