"""Backends behind a unit manager's TCP front door: the llm units of one box.

A :class:`Box` is named by its front door address alone. It learns the rest from the unit
manager over the same protocol (M5Stack's OpenAI plugin does the same): ``sys`` ``lsmode``
lists each model a unit serves (``docs/llm-unit.md``: mode, unit, ``max_context``,
``block_size``, ``kv_events``), one :class:`UnitBackend` per llm unit; each unit's
``stats`` gives vLLM's load signals.

Requests run on *tasks* (``setup`` -> work id ``llm.<n>``), each leased to one request at a
time (:class:`~edgellm.gateway.tasks.TaskPool`), so a task's answers belong to one request and
stopping a request (``pause``, then ``work``) stops no other. The gateway sends the prompt as
``prompt_token_ids`` when it has tokenised it (exactly the ids it routed on), else as
``messages`` / ``prompt``; the request id on the wire is the client's ``X-Request-Id``, so it
shows in the unit's logs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from edgellm.discovery.pod import Pod
from edgellm.gateway.backend import (
    Backend,
    BackendError,
    BackendUnavailable,
    Delta,
    EngineLoad,
    Finished,
    Generation,
    GenerationRequest,
    ModelInfo,
)
from edgellm.gateway.frontdoor import LOST, FrontDoor, FrontDoorError
from edgellm.gateway.tasks import INPUT, StaleTask, TaskPool, unit_error
from edgellm.httpapi.server import is_loopback

log = logging.getLogger(__name__)

_WILDCARDS = ("", "0.0.0.0", "::", "*")
IDLE_TASK_SECONDS = 60.0
"""Idle tasks beyond ``warm_tasks`` unused this long are exited (a burst's are not kept)."""


class Box:
    """One unit manager: its front door, the llm units it lists (see the module docstring)."""

    def __init__(self, host: str, port: int, *, call_timeout: float = 10.0,
                 setup_timeout: float = 120.0, warm_tasks: int = 1, max_tasks: int = 64,
                 claims: dict[str, str] | None = None):  # fmt: skip
        self.host = host
        self.claims = claims if claims is not None else {}
        """Backend key -> the box address using it, shared by every box of a gateway: two
        boxes with one name (identical images keep the same host name) must not merge."""
        self.port = port
        self.address = f"{host}:{port}"
        self.door = FrontDoor(host, port)
        self.call_timeout = call_timeout
        self.setup_timeout = setup_timeout
        self.warm_tasks = warm_tasks
        self.max_tasks = max_tasks
        self.units: dict[str, UnitBackend] = {}
        self.problem: str | None = "not checked yet"
        self._was_connected = False

    async def refresh(self) -> dict[str, UnitBackend]:
        """Connect if needed, list the box's llm units and models, read their load.

        Returns the units now known (new ones created, vanished ones dropped and closed).
        A box that cannot be reached keeps its units, all unhealthy."""
        try:
            reconnecting = not self.door.connected and self._was_connected
            await self.door.connect()
            self._was_connected = True
            if reconnecting:  # the manager may have restarted: its tasks may be gone
                for unit in self.units.values():
                    unit.forget_tasks()
            answer = await self.door.call("lsmode", "sys", timeout=self.call_timeout)
        except FrontDoorError as exc:
            self._down(str(exc))
            return self.units
        entries = answer.get("data")
        if not isinstance(entries, list):
            self._down(f"lsmode answered {answer.get('error')!r}")
            return self.units
        by_unit: dict[str, dict[str, ModelInfo]] = {}
        for entry in entries:
            info = self._model_info(entry)
            if info is not None:
                by_unit.setdefault(entry["unit"], {})[info.name] = info
        for name, models in by_unit.items():
            key, models = self._claim(name, models)
            unit = self.units.get(name)
            if unit is not None and unit.key != key:  # renamed: a new backend for the index
                await self._drop(name)
                unit = None
            if unit is None:
                unit = self.units[name] = UnitBackend(self, name, key)
            unit.set_models(models)
        for name in [n for n in self.units if n not in by_unit]:
            await self._drop(name)
        self.problem = None
        await asyncio.gather(*(unit.refresh() for unit in self.units.values()))
        return self.units

    def _claim(self, unit: str, models: dict[str, ModelInfo]) -> tuple[str, dict[str, ModelInfo]]:
        """The unit's backend key - its KV pod key ``<box>/<unit>`` unless another box has
        it, then ``HOST:PORT/<unit>`` - and its models with their KV pod under that key."""
        key = _unit_key(self.address, unit, models)
        owner = self.claims.setdefault(key, self.address)
        if owner != self.address:
            fallback = f"{self.address}/{unit}"
            if self.units.get(unit) is None or self.units[unit].key != fallback:
                log.warning("%s and %s both call a unit %s: the one at %s is %s here",
                            owner, self.address, key, self.address, fallback)  # fmt: skip
            self.claims.setdefault(fallback, self.address)
            key = fallback
        models = {name: dataclasses.replace(info, kv_pod=dataclasses.replace(
                      info.kv_pod, pod_key=key)) if info.kv_pod is not None else info
                  for name, info in models.items()}  # fmt: skip
        return key, models

    async def _drop(self, unit: str) -> None:
        backend = self.units.pop(unit)
        if self.claims.get(backend.key) == self.address:
            del self.claims[backend.key]
        await backend.close()

    def _down(self, problem: str) -> None:
        self.problem = problem
        for unit in self.units.values():
            unit.healthy = False
            unit.problem = problem

    def _model_info(self, entry: Any) -> ModelInfo | None:
        if not isinstance(entry, dict) or entry.get("type") != "llm":
            return None
        name, unit = entry.get("mode"), entry.get("unit")
        if not isinstance(name, str) or not name or not isinstance(unit, str) or not unit:
            return None  # a static lsmod_dir file names no unit: nothing to talk to
        return ModelInfo(name, _positive(entry.get("max_context")),
                         _positive(entry.get("block_size")),
                         self._kv_pod(entry.get("kv_events"), name, unit))  # fmt: skip

    def _kv_pod(self, kv: Any, model: str, unit: str) -> Pod | None:
        if not isinstance(kv, dict):
            return None
        host = kv.get("host")
        host = host if isinstance(host, str) else ""
        if host in _WILDCARDS:
            host = self.host  # published on every interface: reach it where the box is
        elif is_loopback(host) and not is_loopback(self.host):
            log.warning("%s publishes %s's KV events on %s only: this gateway cannot follow "
                        "them (start the unit manager with a reachable KV event host)",
                        self.address, model, host)  # fmt: skip
            return None
        try:
            return Pod(str(kv.get("pod_key") or f"{self.address}/{unit}"), host, model,
                       pub_port=kv.get("pub_port"), router_port=kv.get("router_port"))  # fmt: skip
        except (ValueError, TypeError) as exc:
            log.warning("%s: unusable kv_events for %s: %s", self.address, model, exc)
            return None

    async def close(self) -> None:
        for unit in list(self.units):
            await self._drop(unit)
        await self.door.close()


class UnitBackend(Backend):
    """One llm unit on a :class:`Box`."""

    kind = "stackflow"

    def __init__(self, box: Box, unit: str, key: str):
        super().__init__()
        self.box = box
        self.unit = unit
        self.key = key
        self._pools: dict[str, TaskPool] = {}
        self._can_tokenize = True

    def set_models(self, models: dict[str, ModelInfo]) -> None:
        previous, self.models = self.models, models
        for name in [n for n in self._pools if n not in models]:
            self.spawn(self._pools.pop(name).close())
        for name in models:
            if name in self._pools and previous.get(name) != models[name]:
                self._forget(self._pools.pop(name))  # the unit restarted: new ports, new tasks
            if name not in self._pools:
                pool = self._pools[name] = TaskPool(
                    self.box.door, self.unit, name, max_context=models[name].max_context,
                    max_tasks=self.box.max_tasks, setup_timeout=self.box.setup_timeout)
                for _ in range(self.box.warm_tasks):
                    self.spawn(pool.warm())

    async def refresh(self) -> None:
        try:
            answer = await self.box.door.call("stats", self.unit, timeout=self.box.call_timeout)
        except FrontDoorError as exc:
            self.healthy, self.problem = False, str(exc)
            return
        data = answer.get("data")
        if not isinstance(data, dict):
            message = str((answer.get("error") or {}).get("message", ""))
            if "has no action" in message:  # a StackFlow unit without vLLM's signals
                self.loads = {}
                self.healthy, self.problem = True, ""
                self._trim()
                return
            self.healthy, self.problem = False, f"stats answered {answer.get('error')!r}"
            return
        for model, stats in data.items():
            if model in self.models and isinstance(stats, dict):
                self.loads[model] = _load(stats)
        self.healthy, self.problem = True, ""
        self._trim()

    def _trim(self) -> None:
        for pool in self._pools.values():
            for work_id in pool.trim(self.box.warm_tasks, IDLE_TASK_SECONDS):
                self.spawn(pool.discard(work_id))

    def forget_tasks(self) -> None:
        """After a reconnection: idle tasks may be gone with a restarted manager; end them
        (best effort, in case it was only the connection) and set up new ones."""
        for pool in self._pools.values():
            self._forget(pool)

    def _forget(self, pool: TaskPool) -> None:
        for work_id in pool.forget():
            self.spawn(pool.discard(work_id))

    async def generate(self, request: GenerationRequest) -> Generation:
        pool = self._pools.get(request.model)
        if pool is None:
            raise BackendUnavailable(f"{self.key} does not serve {request.model!r}")
        work_id = await pool.acquire()
        door = self.box.door
        try:
            queue = door.open_stream(work_id, request.request_id)
            door.send({"request_id": request.request_id, "work_id": work_id,
                       "action": "inference", "object": INPUT, "data": _inference_data(request)})
        except FrontDoorError as exc:
            door.close_stream(work_id)
            pool.forget()
            raise BackendUnavailable(f"{self.key}: {exc}") from None
        return UnitGeneration(self, pool, work_id, queue)

    async def tokenize(self, model: str, *, messages=None, prompt=None) -> list[int]:
        if not self._can_tokenize:
            raise NotImplementedError
        data: dict[str, Any] = {"model": model}
        if messages is not None:
            data["messages"] = messages
        else:
            data["prompt"] = prompt
        try:
            answer = await self.box.door.call("tokenize", self.unit, data,
                                              timeout=self.box.call_timeout)  # fmt: skip
        except FrontDoorError as exc:
            raise BackendUnavailable(f"{self.key}: {exc}") from None
        error = answer.get("error") or {}
        if "has no action" in str(error.get("message", "")):
            self._can_tokenize = False  # a unit without the action: do not ask again
            raise NotImplementedError
        data = answer.get("data")
        ok = error.get("code", 0) == 0 and isinstance(data, dict)
        tokens = data.get("tokens") if ok else None
        if not isinstance(tokens, list):
            raise unit_error(self.key, answer)
        return tokens

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        await super().close()


class UnitGeneration(Generation):
    """One request on one leased task (see :class:`~edgellm.gateway.backend.Generation`)."""

    def __init__(self, backend: UnitBackend, pool: TaskPool, work_id: str, queue: asyncio.Queue):
        self.backend = backend
        self.pool = pool
        self.work_id = work_id
        self.queue = queue
        self.done = False

    async def __anext__(self) -> Delta | Finished:
        while not self.done:
            answer = await self.queue.get()
            if answer is LOST:
                self._end(clean=False)
                raise BackendUnavailable(f"{self.backend.key}: connection to the unit manager "
                                         "lost")  # fmt: skip
            if (answer.get("error") or {}).get("code", 0) != 0:
                error = unit_error(self.backend.key, answer)
                self._end(clean=not isinstance(error, StaleTask))
                if isinstance(error, StaleTask):  # the unit restarted: its other tasks too
                    self.backend._forget(self.pool)
                raise error
            data = answer.get("data")
            if not isinstance(data, dict):
                self._end(clean=False)
                raise BackendError(f"{self.backend.key} answered {str(data)[:100]!r}")
            if data.get("finish"):
                self._end(clean=True)
                return Finished(str(data.get("finish_reason") or "stop"),
                                _count(data.get("prompt_tokens")),
                                _count(data.get("completion_tokens")),
                                _count(data.get("cached_tokens")))  # fmt: skip
            delta = data.get("delta")
            if isinstance(delta, str) and delta:
                return Delta(delta)
        raise StopAsyncIteration

    def _end(self, *, clean: bool) -> None:
        self.done = True
        self.backend.box.door.close_stream(self.work_id)
        if clean:
            self.pool.release(self.work_id)
        else:
            self.backend.spawn(self.pool.discard(self.work_id))

    async def abort(self) -> None:
        if self.done:
            return
        self.done = True
        stopped = await self.pool.stop_generation(self.work_id, self.queue)
        self.backend.box.door.close_stream(self.work_id)
        if stopped:
            self.pool.release(self.work_id)
        else:
            await self.pool.discard(self.work_id)


def _unit_key(address: str, unit: str, models: dict[str, ModelInfo]) -> str:
    """The box's own name for the unit (``<box>/<unit>``, its KV pod key) when its models
    agree on one, else ``HOST:PORT/<unit>``."""
    pods = {info.kv_pod.pod_key for info in models.values() if info.kv_pod is not None}
    return pods.pop() if len(pods) == 1 else f"{address}/{unit}"


def _inference_data(request: GenerationRequest) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if request.prompt_token_ids is not None:
        data["prompt_token_ids"] = request.prompt_token_ids
    elif request.messages is not None:
        data["messages"] = request.messages
    else:
        data["prompt"] = request.prompt
    data.update(request.sampling())
    return data


def _load(stats: dict[str, Any]) -> EngineLoad:
    usage = stats.get("kv_cache_usage_perc")
    usage = float(usage) if isinstance(usage, (int, float)) and 0 <= usage <= 1 else 0.0
    return EngineLoad(_count(stats.get("num_requests_running")) or 0,
                      _count(stats.get("num_requests_waiting")) or 0, usage)  # fmt: skip


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

