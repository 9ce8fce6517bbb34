"""Everything ``edgellm serve`` runs, wired together; :attr:`GatewayRuntime.app` is the ASGI
app, whose lifespan starts and stops the rest.

Start, in order: the prefix index (in memory, fed by an in-process KV event manager that
follows the backends' KV event endpoints; or a shared Redis index that another process
feeds, only read here) -> the backend pool (one refresh, so that ready backends are known
before the first request) -> the watchers of a backends file / Kubernetes. Stop: the
reverse. :meth:`GatewayRuntime.drain` is the HTTP server's drain step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from edgellm.discovery.provider import StaticPodProvider
from edgellm.gateway.app import RequestIds, build_app
from edgellm.gateway.config import GatewayConfig
from edgellm.gateway.metrics import GatewayMetrics
from edgellm.gateway.openai_http import HttpEngine
from edgellm.gateway.pool import BackendPool
from edgellm.gateway.routing import Picker
from edgellm.gateway.service import Gateway
from edgellm.gateway.specs import BoxSpec, EngineSpec, SpecError, parse_backends, spec_from_pod
from edgellm.gateway.tokens import LocalTokenizer, Tokenizers
from edgellm.httpapi import RequestGuard
from edgellm.kvindex.config import IndexConfig
from edgellm.kvindex.router import RouterConfig

log = logging.getLogger(__name__)


class GatewayRuntime:
    def __init__(self, config: GatewayConfig, *, specs: list[BoxSpec | EngineSpec] = (),
                 backends_file: str | None = None, kubernetes: dict[str, Any] | None = None,
                 tokenizers: dict[str, LocalTokenizer] | None = None,
                 index_config: IndexConfig | None = None, router_config: RouterConfig | None = None,
                 box_options: dict[str, Any] | None = None,
                 registry: CollectorRegistry | None = None):  # fmt: skip
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.index_config = index_config or IndexConfig.from_env()
        self.pods = StaticPodProvider()
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=None,
                                                          max_keepalive_connections=64),
                                      timeout=httpx.Timeout(10.0, read=None))  # fmt: skip
        self.pool = BackendPool(pods=self.pods, refresh_interval=config.refresh_interval,
                                box_options=box_options,
                                engine_factory=lambda spec: HttpEngine(spec, self.http))
        self.pool.set_specs("flags", specs)
        self.backends_file = Path(backends_file) if backends_file else None
        if self.backends_file is not None:
            self.pool.set_specs("file", _read_backends(self.backends_file))  # errors: SpecError
        self.kubernetes = kubernetes
        self.index = self._make_index()
        self.kv_manager = None
        self.metrics = GatewayMetrics(self.registry)
        self.metrics.watch(self.pool.backends, lambda key: self.pool.in_flight[key])
        picker = Picker(self.index, router_config or RouterConfig.from_env(),
                        block_size=self.index_config.block_size,
                        blocking=bool(self.index_config.redis_url))  # fmt: skip
        self.tokenizers = Tokenizers(tokenizers, self.pool.serving)
        self.gateway = Gateway(config, self.pool, picker, self.tokenizers, self.metrics)
        self.api = app = build_app(self.gateway, self.registry, lifespan=self._lifespan)
        limits = config.limits
        self.app = RequestIds(RequestGuard(app, api_key=config.api_key, max_body=limits.max_body,
                                           body_timeout=limits.request_timeout,
                                           max_head=limits.max_head))  # fmt: skip
        self._watchers: list[Any] = []

    def _make_index(self):
        if self.index_config.redis_url:
            from edgellm.kvindex.redis_index import RedisPrefixIndex

            return RedisPrefixIndex(self.index_config)
        from edgellm.kvindex.memory import MemoryPrefixIndex

        return MemoryPrefixIndex(self.index_config)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        if not self.index_config.redis_url:
            from edgellm.kvevents.config import ManagerConfig, SubscriberConfig
            from edgellm.kvevents.manager import KVEventManager

            config = ManagerConfig(enabled=True,
                                   subscriber=SubscriberConfig(curve=self.config.kv_curve))
            self.kv_manager = KVEventManager(self.pods, self.index, config=config,
                                             registry=self.registry)  # fmt: skip
            await asyncio.to_thread(self.kv_manager.start)
        await self.pool.start()
        if self.backends_file is not None:
            self._watchers.append(asyncio.get_running_loop().create_task(self._watch_file()))
        if self.kubernetes is not None:
            await asyncio.to_thread(self._start_kubernetes)

    def _start_kubernetes(self) -> None:
        from edgellm.discovery.k8s import KubernetesPodProvider

        provider = KubernetesPodProvider(**self.kubernetes)
        pool = self.pool

        class Listener:
            def _update(self, *_):
                specs = [spec_from_pod(p) for p in provider.pods()]
                pool.set_specs("kubernetes", [s for s in specs if s is not None])

            on_pod_add = on_pod_update = on_pod_delete = _update

        provider.add_listener(Listener())
        provider.start()
        Listener()._update()
        self._watchers.append(provider)

    async def _watch_file(self) -> None:
        """Re-read the backends file when it changes (a bad version is logged, the last
        good one stays)."""
        path = self.backends_file
        seen = _stat(path)
        while True:
            await asyncio.sleep(1.0)
            now = _stat(path)
            if now == seen:
                continue
            seen = now
            try:
                self.pool.set_specs("file", _read_backends(path))
                log.info("backends file %s reloaded", path)
            except SpecError as exc:
                log.error("backends file %s ignored: %s", path, exc)

    async def drain(self) -> None:
        await self.gateway.drain()

    async def stop(self) -> None:
        for watcher in self._watchers:
            if isinstance(watcher, asyncio.Task):
                watcher.cancel()
            else:
                await asyncio.to_thread(watcher.stop)
        self._watchers.clear()
        await self.pool.close()
        if self.kv_manager is not None:
            await asyncio.to_thread(self.kv_manager.stop)
        await asyncio.to_thread(self.index.close)
        await self.http.aclose()


def _read_backends(path: Path) -> list[BoxSpec | EngineSpec]:
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read {path}: {exc}") from None
    return parse_backends(text, as_json=path.suffix.lower() == ".json")


def _stat(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
