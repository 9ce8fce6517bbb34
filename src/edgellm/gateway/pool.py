"""The gateway's backends: made from specs, refreshed, counted, followed for KV events.

:meth:`BackendPool.set_specs` takes the wanted backends of one source (``"flags"``,
``"file"``, ``"kubernetes"``; thread-safe, so watchers may call it from their threads); the
pool reconciles: new specs become a :class:`~edgellm.gateway.stackflow.Box` or an
:class:`~edgellm.gateway.openai_http.HttpEngine`, vanished ones are closed (their requests in
flight finish on the objects they hold).

Every ``refresh_interval`` seconds each box and engine is refreshed (health, models, load);
a backend that fails a request is marked down at once (:meth:`mark_down`) and skipped until
a refresh finds it healthy. After each refresh the KV event endpoints of all backends'
models are handed to ``pods`` (a :class:`StaticPodProvider` the in-process KV event manager
follows), so the index follows exactly the engines the gateway can route to.

In-flight counts are the gateway's own (:meth:`acquire` / :meth:`release`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Iterable

from edgellm.discovery.pod import Pod
from edgellm.discovery.provider import StaticPodProvider
from edgellm.gateway.backend import Backend
from edgellm.gateway.specs import BoxSpec, EngineSpec
from edgellm.gateway.stackflow import Box

log = logging.getLogger(__name__)

REMEMBER_MODELS = 300.0
FRESH_ENOUGH = 0.25
"""A request finding no backend forces a refresh unless one finished this recently (it
then waits for the next one)."""


class BackendPool:
    def __init__(self, *, pods: StaticPodProvider | None = None, refresh_interval: float = 1.0,
                 box_options: dict | None = None, engine_factory=None):  # fmt: skip
        self.pods = pods
        self.refresh_interval = refresh_interval
        self.box_options = box_options or {}
        self._engine_factory = engine_factory
        self._specs: dict[str, list[BoxSpec | EngineSpec]] = {}
        self._boxes: dict[BoxSpec, Box] = {}
        self._claims: dict[str, str] = {}  # unit keys in use, by box (see Box.claims)
        self._engines: dict[EngineSpec, Backend] = {}
        self.in_flight: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self.refreshed = asyncio.Event()
        """Set after each refresh round (tests and readiness waits)."""
        self._seen: dict[str, float] = {}  # model -> when a backend last listed it
        self._refreshed_at = 0.0

    # -- specs -----------------------------------------------------------------------------

    def set_specs(self, source: str, specs: Iterable[BoxSpec | EngineSpec]) -> None:
        """The backends ``source`` wants now; safe from any thread once started."""
        specs = list(dict.fromkeys(specs))
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(self._set_specs, source, specs)
                return
        self._set_specs(source, specs)

    def _set_specs(self, source: str, specs: list) -> None:
        self._specs[source] = specs
        self._changed.set()

    def _reconcile(self) -> None:
        wanted = {spec for specs in self._specs.values() for spec in specs}
        for spec in [s for s in self._boxes if s not in wanted]:
            self._spawn_close(self._boxes.pop(spec))
        for spec in [s for s in self._engines if s not in wanted]:
            self._spawn_close(self._engines.pop(spec))
        for spec in wanted:
            if isinstance(spec, BoxSpec) and spec not in self._boxes:
                self._boxes[spec] = Box(spec.host, spec.port, claims=self._claims,
                                        **self.box_options)  # fmt: skip
            elif isinstance(spec, EngineSpec) and spec not in self._engines:
                if self._engine_factory is None:
                    raise RuntimeError("no HTTP engine support configured")
                self._engines[spec] = self._engine_factory(spec)

    def _spawn_close(self, thing) -> None:
        asyncio.get_running_loop().create_task(thing.close())

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Refresh once (so that ready backends are known), then keep refreshing."""
        self._loop = asyncio.get_running_loop()
        await self.refresh()
        self._task = self._loop.create_task(self._run(), name="backend-refresh")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), self.refresh_interval)
            except TimeoutError:
                pass
            try:
                await self.refresh()
            except Exception:
                log.exception("backend refresh failed")

    async def refresh(self) -> None:
        self._changed.clear()
        self._reconcile()
        await asyncio.gather(*(box.refresh() for box in self._boxes.values()),
                             *(engine.refresh() for engine in self._engines.values()))  # fmt: skip
        self._publish_pods()
        now = self._refreshed_at = time.monotonic()
        for backend in self.backends():
            for model in backend.models:
                self._seen[model] = now
        self.refreshed.set()
        self.refreshed = asyncio.Event()

    async def refresh_soon(self, timeout: float) -> None:
        """Ask for a refresh now and wait (at most ``timeout``) for it: a request that finds
        no backend gives one that just came back (a restarted unit) the chance to be seen."""
        if self._task is None:
            return
        refreshed = self.refreshed
        if time.monotonic() - self._refreshed_at >= FRESH_ENOUGH:
            self._changed.set()  # else the next round comes soon anyway: floods stay cheap
        try:
            await asyncio.wait_for(refreshed.wait(), timeout)
        except TimeoutError:
            pass

    def _publish_pods(self) -> None:
        if self.pods is None:
            return
        pods: dict[str, Pod] = {}
        for backend in self.backends():
            for info in backend.models.values():
                pod = info.kv_pod
                if pod is None:
                    continue
                if pod.pod_key in pods and pods[pod.pod_key] != pod:
                    log.warning("two backends claim KV pod %s; following the first", pod.pod_key)
                    continue
                pods[pod.pod_key] = pod
        self.pods.replace(pods.values())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        await asyncio.gather(*(b.close() for b in self._boxes.values()),
                             *(e.close() for e in self._engines.values()),
                             return_exceptions=True)  # fmt: skip
        self._boxes.clear()
        self._engines.clear()

    # -- queries -----------------------------------------------------------------------------

    def backends(self) -> list[Backend]:
        out: list[Backend] = []
        for box in self._boxes.values():
            out.extend(box.units.values())
        out.extend(self._engines.values())
        return out

    def known_models(self) -> set[str]:
        """Models a backend lists now or listed within :data:`REMEMBER_MODELS` seconds (one
        restarting is unavailable, not unknown)."""
        horizon = time.monotonic() - REMEMBER_MODELS
        return {m for m, seen in self._seen.items() if seen >= horizon} | {
            m for b in self.backends() for m in b.models}

    def serving(self, model: str, exclude: Iterable[str] = ()) -> list[Backend]:
        """Healthy backends serving ``model``, except the keys in ``exclude``."""
        skip = set(exclude)
        return [b for b in self.backends()
                if b.healthy and model in b.models and b.key not in skip]  # fmt: skip

    def problems(self) -> dict[str, str]:
        out = {f"box {box.address}": box.problem for box in self._boxes.values() if box.problem}
        out.update({b.key: b.problem for b in self.backends() if not b.healthy})
        return out

    # -- accounting ------------------------------------------------------------------------

    def acquire(self, backend: Backend) -> None:
        self.in_flight[backend.key] += 1

    def release(self, backend: Backend) -> None:
        self.in_flight[backend.key] -= 1
        if self.in_flight[backend.key] <= 0:
            del self.in_flight[backend.key]

    def mark_down(self, backend: Backend, problem: str) -> None:
        if backend.healthy:
            log.warning("backend %s marked down: %s", backend.key, problem)
        backend.healthy = False
        backend.problem = problem
