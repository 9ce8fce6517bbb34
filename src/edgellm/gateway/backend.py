"""What the gateway asks of a backend, whatever it speaks, and what it gets back.

A *backend* is one serving engine: an llm unit behind a unit manager's TCP front door
(:mod:`~edgellm.gateway.stackflow`) or an OpenAI-compatible HTTP engine
(:mod:`~edgellm.gateway.openai_http`). It serves some models (:class:`ModelInfo`), reports
its load (:class:`EngineLoad`), and runs a :class:`Generation` per request: an async
iterator of :class:`Delta` pieces ending in one :class:`Finished`, or raising
:class:`BackendError`.

Exceptions (one tree)::

    BackendError              the generation failed; .status / .code for the client
    +-- RequestRefused        the request's own fault (400...): never retried
    +-- BackendUnavailable    the backend failed, not the request: before the first piece,
                              the gateway retries elsewhere (.retriable is True)
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from edgellm.discovery.pod import Pod

log = logging.getLogger(__name__)


class BackendError(Exception):
    """A generation failed. ``status``/``code`` become the client's error."""

    retriable = False

    def __init__(self, message: str, *, status: int = 502, code: str = "backend_error",
                 param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param


class RequestRefused(BackendError):
    """The backend refused the request itself (out of range, too long...)."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_value",
                 param: str | None = None):  # fmt: skip
        super().__init__(message, status=status, code=code, param=param)


class BackendUnavailable(BackendError):
    """The backend could not serve (down, overloaded, model missing): try another."""

    retriable = True

    def __init__(self, message: str, *, status: int = 503, code: str = "backend_unavailable"):
        super().__init__(message, status=status, code=code)


@dataclass(frozen=True)
class ModelInfo:
    """A model as one backend serves it."""

    name: str
    max_context: int | None = None
    block_size: int | None = None
    kv_pod: Pod | None = None
    """Where the backend publishes this model's KV events (``kv_pod.pod_key`` is the key
    its cache has in the prefix index); None: the router cannot see its cache."""


@dataclass(frozen=True)
class EngineLoad:
    """vLLM's load signals of one model on one backend, as last reported."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    at: float = field(default_factory=time.monotonic)


@dataclass
class GenerationRequest:
    """One request, as every backend needs it."""

    request_id: str
    """The client's ``X-Request-Id`` (or one made up): carried to the engine's logs."""
    model: str
    kind: str
    """``"chat"`` or ``"completion"``."""
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    """Exactly what the engine will see, when the gateway tokenised it (or was given it)."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool | None = None
    cache_salt: str | None = None
    body: dict[str, Any] = field(default_factory=dict)
    """The client's JSON body, for backends that speak OpenAI themselves."""

    def sampling(self) -> dict[str, Any]:
        """The sampling overrides that are set, under the llm unit's names."""
        names = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos",
                 "cache_salt")  # fmt: skip
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class Delta:
    """Generated text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a generation, with its usage."""

    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None


class Generation(ABC):
    """One request running on one backend: iterate for :class:`Delta` s then one
    :class:`Finished`; :meth:`abort` stops it on the engine (idempotent, never raises)."""

    def __aiter__(self) -> AsyncIterator[Delta | Finished]:
        return self

    @abstractmethod
    async def __anext__(self) -> Delta | Finished: ...

    @abstractmethod
    async def abort(self) -> None: ...


class Backend(ABC):
    """One engine (see the module docstring). Lifecycle: :meth:`refresh` (called
    periodically: health, models, load), :meth:`close` (idempotent)."""

    key: str
    """Unique among the gateway's backends; the ``target-pod`` header and metric label."""
    kind: str

    def __init__(self) -> None:
        self.models: dict[str, ModelInfo] = {}
        self.loads: dict[str, EngineLoad] = {}
        self.healthy = False
        self.problem = "not checked yet"
        self._background: set[asyncio.Task] = set()

    @abstractmethod
    async def refresh(self) -> None:
        """Check health, learn models and load; sets :attr:`healthy` / :attr:`problem`."""

    @abstractmethod
    async def generate(self, request: GenerationRequest) -> Generation:
        """Start ``request``; raises :class:`BackendError` if it cannot even start."""

    async def tokenize(self, model: str, *, messages: list[dict[str, str]] | None = None,
                       prompt: str | None = None) -> list[int]:  # fmt: skip
        """The token ids the engine would feed for this input; raises
        :class:`BackendError` (``NotImplementedError`` if the backend cannot say)."""
        raise NotImplementedError

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()

    def spawn(self, coro) -> None:
        """Run ``coro`` in the background (aborts that must outlive a cancelled request)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "ready": self.healthy, "problem": None if self.healthy else
                self.problem, "models": sorted(self.models)}  # fmt: skip
