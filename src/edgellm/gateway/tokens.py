"""Token ids of a request, exactly as its engine will see them.

The router matches token ids, so they must be the engine's: chat template included, special
tokens as the engine adds them. Preferred: a tokenizer loaded here (:class:`LocalTokenizer`,
from :mod:`edgellm.models`, the same code the llm unit uses - no PyTorch). Otherwise the
engine is asked (the llm unit's ``tokenize`` action, vLLM's ``POST /tokenize``): one round
trip per request, and a model the gateway has no files for still routes by cache.

Ids from a local tokenizer (or given by the client) are also what the gateway sends an llm
unit, so routing and serving use the very same ids; ids an engine computed are used for
routing only.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Protocol, Sequence

from edgellm.gateway.backend import Backend, BackendError, GenerationRequest, RequestRefused
from edgellm.httpapi import APIError

log = logging.getLogger(__name__)


class LocalTokenizer(Protocol):
    """One model's tokenizer, rendering its chat template as the engine does
    (:class:`edgellm.models.Tokenizer`)."""

    def encode_chat(self, messages: list[dict[str, str]], *,
                    add_generation_prompt: bool = True) -> list[int]: ...  # fmt: skip

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...


class Tokenizers:
    """Local tokenizers by model name, and the engines to ask for the rest."""

    def __init__(self, local: dict[str, LocalTokenizer] | None = None,
                 backends: Callable[[str], Iterable[Backend]] | None = None, *,
                 retry_after: float = 60.0):  # fmt: skip
        self.local = dict(local or {})
        self._backends = backends or (lambda model: ())
        self.retry_after = retry_after
        self._unable: dict[tuple[str, str], float] = {}  # (backend, model) -> ask again after

    def tokenizer(self, model: str) -> LocalTokenizer | None:
        return self.local.get(model)

    def local_ids(self, request: GenerationRequest) -> list[int] | None:
        """The request's prompt ids from a local tokenizer (None without one)."""
        tokenizer = self.local.get(request.model)
        if tokenizer is None:
            return None
        try:
            if request.messages is not None:
                return tokenizer.encode_chat(request.messages)
            return tokenizer.encode(request.prompt or "")
        except ValueError as exc:  # the template refused the messages (TokenizerError)
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None

    async def remote_ids(self, request: GenerationRequest) -> list[int] | None:
        """The ids as an engine serving the model computes them; None if none can say. An
        engine that could not is not asked again for ``retry_after`` seconds. An engine that
        refused the request itself (empty messages...) raises :class:`APIError` with its
        reason: the client's error, which says nothing about the engine."""
        now = time.monotonic()
        for backend in self._backends(request.model):
            memo = (backend.key, request.model)
            if self._unable.get(memo, 0.0) > now:
                continue
            try:
                return await backend.tokenize(request.model, messages=request.messages,
                                              prompt=request.prompt)  # fmt: skip
            except NotImplementedError:
                self._unable[memo] = now + self.retry_after
            except RequestRefused as exc:
                raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None
            except BackendError as exc:  # perhaps passing: ask again soon
                log.debug("remote tokenisation on %s failed: %r", backend.key, exc)
                self._unable[memo] = now + min(5.0, self.retry_after)
        return None
