"""The unit manager daemon: every socket in one asyncio event loop thread.

- the ``sys`` RPC service (ROUTER at ``rpc.sys``, :mod:`edgellm.manager.sys_service`);
- one inference XPUB per registered task (:mod:`edgellm.manager.units`);
- the TCP front door, one :class:`~edgellm.manager.session.Session` (and PULL) per client;
- asyncio REQ clients of units' RPC services (:mod:`edgellm.manager.dispatch`).

One owner for all of them means no locks. ``stop()`` goes in a fixed order: stop accepting,
close sessions (their PULL files go), close task sockets, stop the sys service (its file
goes), close the ZeroMQ context. It is idempotent and never waits on a peer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import zmq
import zmq.asyncio

from edgellm.comm.rpc import LIST_ACTION, bind_router, serve_rpc
from edgellm.comm.urls import ipc_path, remove_ipc_file, rpc_url
from edgellm.manager.allocator import ConnectionIds
from edgellm.manager.config import ManagerConfig
from edgellm.manager.dispatch import DETACH_GRACE, Dispatcher
from edgellm.manager.leases import UnitLeases
from edgellm.manager.session import Session
from edgellm.manager.store import KeyValueStore
from edgellm.manager.sys_service import SysService
from edgellm.manager.sysinfo import HwInfo
from edgellm.manager.units import UnitRegistry, UnitTask

log = logging.getLogger(__name__)

PROBE_TIMEOUT_MS = 300


class ManagerRunning(RuntimeError):
    """Another unit manager already answers at this runtime dir's ``rpc.sys``."""


def _probe_sys(ctx: zmq.Context, url: str) -> bool:
    """Whether a live service answers ``list_action`` at ``url`` (a stale file does not)."""
    path = ipc_path(url)
    if path is not None and not os.path.exists(path):
        return False
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(url)
        sock.send_multipart([LIST_ACTION.encode(), b""])
        return bool(sock.poll(PROBE_TIMEOUT_MS, zmq.POLLIN))
    finally:
        sock.close(linger=0)


class UnitManager:
    """Start with ``await start()`` inside a running loop; ``await stop()`` (idempotent)."""

    def __init__(self, config: ManagerConfig):
        self.config = config
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.zmq_context = zmq.Context()
        # A context of its own (not a shadow): destroy() closes every socket made from it,
        # REQ sockets of unit calls still in flight included, so stop() never blocks in
        # zmq_ctx_term on a socket nobody closed.
        self.async_context = zmq.asyncio.Context()
        self.store = KeyValueStore(
            {
                "config_zmq_s_format": config.zmq_s_format,
                "config_zmq_c_format": config.zmq_c_format,
                "sys.box_name": config.box_name,
            }
        )
        self.connection_ids = ConnectionIds()
        self.sessions: set[Session] = set()
        self.hwinfo = HwInfo()
        self.registry: UnitRegistry = None  # type: ignore[assignment]
        self.leases: UnitLeases | None = None
        self.dispatcher: Dispatcher = None  # type: ignore[assignment]
        self.sys_url = rpc_url("sys", config.runtime_dir)
        self.port: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._rpc_task: asyncio.Task | None = None
        self._started = False
        self._stopped = False

    async def start(self) -> "UnitManager":
        """Bind everything; raises :class:`ManagerRunning` or ``OSError`` (nothing left bound)."""
        if self._started:
            raise RuntimeError("UnitManager already started")
        self._started = True
        self.loop = asyncio.get_running_loop()
        if _probe_sys(self.zmq_context, self.sys_url):
            await self.stop()
            raise ManagerRunning(f"a unit manager already serves {self.sys_url}")
        self.registry = UnitRegistry(
            self.config, self.zmq_context, self.loop, self.store, on_detach=self._on_detach
        )
        self.leases = UnitLeases(
            self.registry.ports, self.store, self.config.runtime_dir, self.config.orphan_timeout
        )
        self.leases.watch(self.loop)
        self.dispatcher = Dispatcher(self)
        try:
            self._router, _ = bind_router(
                self.async_context, "sys", self.config.runtime_dir, self.config.ipc_mode
            )
            self._rpc_task = self.loop.create_task(
                serve_rpc(self._router, SysService(self.registry, self.store, self.leases).dispatcher()),
                name="sys-rpc",
            )
            if self.config.enable_tcp:
                self._server = await self.loop.create_server(
                    lambda: Session(self),
                    self.config.host,
                    self.config.port,
                    reuse_address=True,
                )
                self.port = self._server.sockets[0].getsockname()[1]
        except BaseException:
            await self.stop()
            raise
        log.info("unit manager serving %s, tcp %s:%s", self.sys_url, self.config.host, self.port)
        return self

    def _on_detach(self, task: UnitTask) -> None:
        for session in list(self.sessions):
            session.pending.detach(task.work_id, DETACH_GRACE)

    async def stop(self) -> None:
        """Close every session and socket and remove every file created; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.close()
        calls = [session.call for session in self.sessions if session.call is not None]
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()
            session.close()  # cancels the session's unit call, if one is in flight
        if self.leases is not None:
            self.leases.close()
        if self.registry is not None:
            self.registry.close()
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self._rpc_task is not None:
            self._rpc_task.cancel()
            try:
                await self._rpc_task
            except (asyncio.CancelledError, Exception):
                pass
        if self._router is not None:
            self._router.close(linger=0)
            remove_ipc_file(self.sys_url)
        if calls:
            await asyncio.wait(calls, timeout=0.5)
        self.async_context.destroy(linger=0)
        self.zmq_context.destroy(linger=0)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except (asyncio.TimeoutError, Exception):
                pass
        log.info("unit manager stopped")

    async def __aenter__(self) -> "UnitManager":
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


async def serve(config: ManagerConfig, ready=None) -> int:
    """Run until SIGTERM/SIGINT; ``ready(manager)`` is called once everything is bound."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    manager = UnitManager(config)
    try:
        await manager.start()
    except (ManagerRunning, OSError, zmq.ZMQError) as exc:
        print(f"edgellm unit-manager: {exc}", file=sys.stderr)
        return 1
    try:
        if ready is not None:
            ready(manager)
        await stop.wait()
        log.info("signal received, stopping")
    finally:
        await manager.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
