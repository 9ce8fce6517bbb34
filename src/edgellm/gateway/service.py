"""The request path, between the HTTP layer and the backends.

:meth:`Gateway.start` takes a :class:`~edgellm.gateway.backend.GenerationRequest` to its
first piece: model known (else 404) -> prompt ids (:mod:`~edgellm.gateway.tokens`) -> lengths
checked against the model's context (400) -> candidates: healthy backends of the model with
room (none healthy: 503; all full: 429 + ``Retry-After``) -> a backend picked by the routing
strategy -> the generation started and its first piece awaited. A backend that fails before
that piece (:class:`~edgellm.gateway.backend.BackendUnavailable`, or no piece within
``first_piece_timeout``) is marked down and the request tried on another, up to
``max_attempts`` backends; a stale task gets one more try on the same backend.

The returned :class:`Running` yields the rest; every request ends in exactly one of: its
:class:`~edgellm.gateway.backend.Finished`, a :class:`~edgellm.gateway.backend.BackendError`,
:class:`~edgellm.httpapi.APIError` 504 past its deadline, or an abort (the client left:
:meth:`Running.abort_soon` stops it on the engine in the background).

:meth:`Gateway.drain` (SIGTERM): new requests get 503; those in flight get
``drain_timeout`` seconds, then are interrupted (their clients get an error).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import AsyncIterator

from edgellm.gateway.backend import (
    Backend,
    BackendError,
    BackendUnavailable,
    Delta,
    Finished,
    Generation,
    GenerationRequest,
)
from edgellm.gateway.config import GatewayConfig
from edgellm.gateway.metrics import GatewayMetrics
from edgellm.gateway.pool import BackendPool
from edgellm.gateway.routing import STRATEGIES, Candidate, Choice, Picker, pod_load
from edgellm.gateway.tokens import Tokenizers
from edgellm.httpapi import APIError

log = logging.getLogger(__name__)


class Interrupted(BackendError):
    """The gateway is shutting down and the request's time is up."""

    def __init__(self, message: str = "the server is shutting down"):
        super().__init__(message, status=503, code="shutting_down")


class Running:
    """A request on its backend, after its first piece (see the module docstring)."""

    def __init__(self, gateway: "Gateway", request: GenerationRequest, choice: Choice,
                 generation: Generation, first: Delta | Finished, arrived: float,
                 deadline: float, attempts: int):  # fmt: skip
        self.gateway = gateway
        self.request = request
        self.choice = choice
        self.backend = choice.backend
        self.generation = generation
        self.arrived = arrived
        self.deadline = deadline
        self.attempts = attempts
        self.finished: Finished | None = None
        self._first: Delta | Finished | None = first
        self._interrupt: asyncio.Future | None = None
        self._closed = False
        self.first_token_at: float | None = None

    async def events(self) -> AsyncIterator[Delta | Finished]:
        """The pieces, the first one included; ends after :class:`Finished`. Raises
        :class:`BackendError` or :class:`APIError` 504 (the request is then over)."""
        try:
            while True:
                if self._first is not None:
                    event, self._first = self._first, None
                else:
                    event = await self._next()
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                if isinstance(event, Finished):
                    self.finished = event
                    yield event
                    return
                yield event
        except (BackendError, APIError):
            self.abort_soon()
            raise

    async def _next(self) -> Delta | Finished:
        if self._interrupt is None:
            self._interrupt = asyncio.get_running_loop().create_future()
        piece = asyncio.ensure_future(anext(self.generation))
        try:
            done, _ = await asyncio.wait({piece, self._interrupt}, timeout=max(
                0.0, self.deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            piece.cancel()
            raise
        if piece in done:
            try:
                return piece.result()
            except StopAsyncIteration:
                raise BackendError(f"{self.backend.key} ended the stream without finishing")
        piece.cancel()
        if self._interrupt in done:
            raise self._interrupt.result()
        raise APIError(504, f"the request took over {self.gateway.config.request_timeout:g}s",
                       code="timeout")  # fmt: skip

    def interrupt(self, error: BackendError) -> None:
        if self._interrupt is None:
            self._interrupt = asyncio.get_running_loop().create_future()
        if not self._interrupt.done():
            self._interrupt.set_result(error)

    def abort_soon(self) -> None:
        """Stop the generation on the engine, in the background (the caller may be being
        cancelled); then :meth:`close`."""
        if self.finished is None and not self._closed:
            self.backend.spawn(self.generation.abort())
        self.close()

    def close(self) -> None:
        """Count the request as over (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.gateway._done(self)


class Gateway:
    def __init__(self, config: GatewayConfig, pool: BackendPool, picker: Picker,
                 tokenizers: Tokenizers, metrics: GatewayMetrics):  # fmt: skip
        self.config = config
        self.pool = pool
        self.picker = picker
        self.tokenizers = tokenizers
        self.metrics = metrics
        self.running: set[Running] = set()
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._durations: dict[str, float] = {}  # backend -> EWMA of request seconds

    # -- the request path ------------------------------------------------------------------

    def strategy(self, header: str | None) -> str:
        if header is None or not header.strip():
            return self.config.strategy
        value = header.strip().lower()
        if value not in STRATEGIES:
            raise APIError(400, f"unknown routing-strategy {header!r}: one of "
                           f"{', '.join(STRATEGIES)}", param="routing-strategy",
                           code="invalid_routing_strategy")  # fmt: skip
        return value

    def max_context(self, model: str) -> int | None:
        contexts = [b.models[model].max_context for b in self.pool.backends()
                    if model in b.models and b.models[model].max_context]  # fmt: skip
        return min(contexts) if contexts else None

    async def check_model(self, model: str) -> None:
        """404 for a model no backend serves (nor served lately), after one fresh look."""
        if model in self.pool.known_models():
            return
        await self.pool.refresh_soon(self.config.refresh_interval + 1.0)
        if model not in self.pool.known_models():
            raise APIError(404, f"The model `{model}` does not exist.", param="model",
                           code="model_not_found")  # fmt: skip

    async def prompt_ids(self, request: GenerationRequest, strategy: str) -> list[int] | None:
        """The ids to route on (see :mod:`edgellm.gateway.tokens`); local ones also go to
        the engine. Engines are asked only when the strategy needs ids."""
        if request.prompt_token_ids is not None:
            return request.prompt_token_ids
        ids = self.tokenizers.local_ids(request)
        if ids is not None:
            request.prompt_token_ids = ids
            return ids
        if strategy == "prefix-cache":
            return await self.tokenizers.remote_ids(request)
        return None

    def check_lengths(self, request: GenerationRequest, prompt_tokens: int | None) -> None:
        """400 for a prompt that leaves no room in the context, or ``max_tokens`` beyond
        it; fills in ``max_tokens`` (the rest of the context) when it is known."""
        context = self.max_context(request.model)
        if context is None:
            return
        if prompt_tokens is None:  # unknown, but a prompt has at least one token
            if request.max_tokens is not None and request.max_tokens >= context:
                raise APIError(400, f"This model's maximum context length is {context} tokens; "
                               f"max_tokens={request.max_tokens} leaves no room for a prompt.",
                               param="max_tokens", code="context_length_exceeded")  # fmt: skip
            return
        if prompt_tokens >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. "
                           f"However, your prompt has {prompt_tokens} tokens, which leaves no "
                           "room for a completion.", param="messages" if request.kind == "chat"
                           else "prompt", code="context_length_exceeded")  # fmt: skip
        room = context - prompt_tokens
        if request.max_tokens is None:
            request.max_tokens = room
        elif request.max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {context} tokens. "
                           f"However, you requested {prompt_tokens + request.max_tokens} tokens "
                           f"({prompt_tokens} in the prompt, {request.max_tokens} for the "
                           "completion). Please reduce the prompt or the completion length.",
                           param="max_tokens", code="context_length_exceeded")  # fmt: skip

    async def start(self, request: GenerationRequest, strategy: str,
                    token_ids: list[int] | None, arrived: float) -> Running:  # fmt: skip
        """Route and start ``request`` (see the module docstring)."""
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise APIError(503, "the server is shutting down", code="shutting_down")
        deadline = arrived + self.config.request_timeout
        tried: set[str] = set()
        retried_same: set[str] = set()
        last: BackendError | None = None
        for attempt in range(1, self.config.max_attempts + 1):
            choice = await self._choose(request, strategy, token_ids, tried, last)
            backend = choice.backend
            self.metrics.decisions.labels(strategy, choice.reason, backend.key).inc()
            self.pool.acquire(backend)
            generation = None
            try:
                generation = await backend.generate(request)
                async with asyncio.timeout(min(self.config.first_piece_timeout,
                                               max(0.0, deadline - time.monotonic()))):
                    first = await anext(generation)
            except (BackendUnavailable, TimeoutError, StopAsyncIteration) as exc:
                self.pool.release(backend)
                if generation is not None and isinstance(exc, TimeoutError):
                    backend.spawn(generation.abort())
                if time.monotonic() >= deadline:
                    raise APIError(504, "no backend answered in time", code="timeout") from None
                last = exc if isinstance(exc, BackendError) else BackendUnavailable(
                    f"{backend.key}: no first piece within {self.config.first_piece_timeout:g}s")
                if getattr(exc, "same_backend", False) and backend.key not in retried_same:
                    retried_same.add(backend.key)  # a stale task: the backend may be fine
                else:
                    if last.status != 429:  # busy is not down
                        self.pool.mark_down(backend, last.message)
                    tried.add(backend.key)
                again = attempt < self.config.max_attempts
                if again:
                    self.metrics.retries.labels(backend.key, type(last).__name__).inc()
                log.warning("request %s: %s failed before its first piece (%s); %s",
                            request.request_id, backend.key, last.message,
                            "retrying" if again else "giving up")  # fmt: skip
                continue
            except BaseException:
                self.pool.release(backend)
                if generation is not None:
                    backend.spawn(generation.abort())
                raise
            running = Running(self, request, choice, generation, first, arrived, deadline, attempt)
            self.running.add(running)
            self._idle.clear()
            return running
        assert last is not None  # the loop ran, and every attempt failed
        raise APIError(last.status, last.message, code=last.code)

    async def _choose(self, request: GenerationRequest, strategy: str, token_ids,
                      tried: set[str], last: BackendError | None) -> Choice:  # fmt: skip
        backends = self.pool.serving(request.model, exclude=tried)
        if not backends and last is None:  # perhaps one is just coming back: look once more
            await self.pool.refresh_soon(self.config.refresh_interval + 1.0)
            backends = self.pool.serving(request.model, exclude=tried)
        if not backends:
            self.metrics.rejected.labels("no_backend").inc()
            if last is not None:
                raise APIError(last.status, last.message, code=last.code)
            problems = "; ".join(f"{k}: {v}" for k, v in self.pool.problems().items())
            raise APIError(503, f"no backend serving {request.model!r} is ready"
                           + (f" ({problems[:500]})" if problems else ""),
                           code="no_backend_available")  # fmt: skip
        room = [b for b in backends if self.pool.in_flight[b.key] < self.config.max_queue]
        if not room:
            self.metrics.rejected.labels("queue_full").inc()
            retry = self._retry_after(backends)
            raise APIError(429, f"every backend serving {request.model!r} has "
                           f"{self.config.max_queue} requests in flight; retry in {retry}s",
                           code="queue_full", headers={"Retry-After": str(retry)})  # fmt: skip
        candidates = [self._candidate(b, request.model) for b in room]
        salt = request.cache_salt
        if self.picker.blocking and strategy == "prefix-cache" and salt is None:  # Redis
            return await asyncio.to_thread(self.picker.pick, strategy, request.model,
                                           candidates, token_ids)  # fmt: skip
        return self.picker.pick(strategy, request.model, candidates, token_ids, salt)

    def _candidate(self, backend: Backend, model: str) -> Candidate:
        info = backend.models[model]
        key = info.kv_pod.pod_key if info.kv_pod is not None else backend.key
        return Candidate(backend, key, pod_load(self.pool.in_flight[backend.key],
                                                backend.loads.get(model)))  # fmt: skip

    def _retry_after(self, backends: list[Backend]) -> int:
        """Seconds until a slot is likely free: the shortest typical request duration."""
        known = [self._durations[b.key] for b in backends if b.key in self._durations]
        return max(1, min(60, math.ceil(min(known)))) if known else 1

    def _done(self, running: Running) -> None:
        self.running.discard(running)
        self.pool.release(running.backend)
        seconds = time.monotonic() - running.arrived
        key = running.backend.key
        self._durations[key] = 0.8 * self._durations.get(key, seconds) + 0.2 * seconds
        if not self.running:
            self._idle.set()

    # -- shutdown ----------------------------------------------------------------------------

    async def drain(self) -> None:
        """Refuse new requests; give those in flight ``drain_timeout``; interrupt the rest."""
        self.draining = True
        if self.running:
            log.info("draining %d request(s) for up to %gs", len(self.running),
                     self.config.drain_timeout)  # fmt: skip
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout)
            except TimeoutError:
                log.warning("ending %d request(s) still running", len(self.running))
                for running in list(self.running):
                    running.interrupt(Interrupted())
                try:
                    await asyncio.wait_for(self._idle.wait(), 5.0)
                except TimeoutError:
                    pass
