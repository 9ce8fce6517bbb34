"""One request's life in the engine: its tokens, its blocks, its text, its end.

A request is *waiting* (queued, or preempted: its blocks were taken back and its tokens will
be recomputed, mostly from the prefix cache) or *running* (it holds a block table and
``num_computed`` of its tokens have KV), then *finished* with a reason: ``"stop"`` (an
end-of-sequence token or a stop string), ``"length"`` (``max_tokens``, the context limit, or
a KV pool too small to hold it), ``"abort"`` (cancelled) or ``"error"`` (the model failed).

The text is decoded incrementally and never splits a character; with stop strings, the
last ``max(len(stop)) - 1`` characters are held back until they cannot start one, so the
text sent never contains a stop string, also when one spans several tokens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Sequence

from edgellm.engine.block_hash import BlockHasher
from edgellm.engine.block_pool import Block
from edgellm.engine.sampling import SamplingParams
from edgellm.models.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one engine step produced for a request (delivered to its ``on_output``)."""

    request_id: str
    text: str
    """New text since the previous output (may be empty)."""
    token_ids: tuple[int, ...]
    """New token ids since the previous output."""
    finished: bool
    finish_reason: str | None
    """``"stop"``, ``"length"``, ``"abort"`` or ``"error"`` once finished."""
    prompt_tokens: int
    cached_tokens: int
    """Prompt tokens whose KV came from the prefix cache (at first admission)."""
    completion_tokens: int
    error: str | None = None


OutputHandler = Callable[[RequestOutput], None]


class Request:
    """Engine-thread state of one request (see the module docstring)."""

    def __init__(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                 on_output: OutputHandler, detokenizer: IncrementalDetokenizer,
                 hasher: BlockHasher, stop_ids: frozenset[int], arrival: float):  # fmt: skip
        self.request_id = request_id
        self.params = params
        self.on_output = on_output
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt = len(self.token_ids)
        self.status = Status.WAITING
        self.arrival = arrival
        self.blocks: list[Block] = []
        self.num_computed = 0
        self.num_cached_blocks = 0
        """Leading blocks of ``blocks`` that are in the prefix cache (hit or stored)."""
        self.cached_tokens: int | None = None
        self.hasher = hasher
        hasher.extend(self.token_ids)
        self.stop_ids = stop_ids
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._detok = detokenizer
        self._text = ""
        self._sent = 0
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self._new_ids: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def block_hashes(self) -> list[bytes]:
        return self.hasher.hashes

    @property
    def prefilling(self) -> bool:
        """KV is missing for more than the last token."""
        return self.num_tokens - self.num_computed > 1

    # -- generation ----------------------------------------------------------------------

    def append(self, token_id: int, max_model_len: int) -> None:
        """A sampled token: extend tokens, hashes and text; decide whether it ends the request."""
        self.token_ids.append(token_id)
        self.hasher.extend(self.token_ids)
        self._new_ids.append(token_id)
        params = self.params
        if (token_id in self.stop_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
            self.finish_reason = "stop"
            return
        self._text += self._detok.push(token_id)
        if params.stop and self._find_stop():
            return
        if self.num_output >= params.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = "length"

    def _find_stop(self) -> bool:
        text = self._text
        start = max(0, self._sent - self._holdback)
        best = -1
        for stop in self.params.stop:
            at = text.find(stop, start)
            if at != -1 and (best == -1 or at < best):
                best = at
        if best == -1:
            return False
        self._text = text[:best]
        self.finish_reason = "stop"
        return True

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None or reason in ("abort", "error"):
            self.finish_reason = reason
        self.error = error
        self.status = Status.FINISHED

    def take_output(self) -> RequestOutput | None:
        """The output since the last call, or None if there is nothing new to say."""
        finished = self.status is Status.FINISHED
        end = len(self._text) if finished else max(self._sent, len(self._text) - self._holdback)
        if not self.params.stop:
            end = len(self._text)
        text = self._text[self._sent : end]
        if not text and not self._new_ids and not finished:
            return None
        self._sent = end
        ids, self._new_ids = tuple(self._new_ids), []
        return RequestOutput(
            self.request_id, text, ids, finished, self.finish_reason if finished else None,
            self.num_prompt, self.cached_tokens or 0, self.num_output, self.error,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (f"<Request {self.request_id} {self.status.value} tokens={self.num_tokens} "
                f"computed={self.num_computed} blocks={len(self.blocks)}>")  # fmt: skip
