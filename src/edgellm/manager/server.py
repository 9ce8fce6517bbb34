"""The unit manager daemon: every socket in one asyncio event loop thread.

:class:`UnitManager` builds the parts drawn in :mod:`edgellm.manager` and hands each the
collaborators it uses; none of them knows the manager. One owner (the loop) for every
socket means no locks. ``stop()`` goes in a fixed order: stop accepting, close sessions
(their PULL files go), close task sockets, end unit calls in flight, stop the sys service
(its file goes). It is idempotent and never waits on a peer for long.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import signal
import sys
import time

from edgellm.comm.errors import CommError, RpcUnavailable
from edgellm.comm.rpc_asyncio import AsyncRpcClient, AsyncRpcServer
from edgellm.comm.rpc_thread import probe
from edgellm.comm.urls import rpc_url
from edgellm.manager.allocator import ConnectionIds
from edgellm.manager.config import ManagerConfig
from edgellm.manager.dispatch import DETACH_GRACE, Dispatcher
from edgellm.manager.leases import UnitLeases
from edgellm.manager.listener import Listener
from edgellm.protocol import sys_rpc
from edgellm.protocol.rpc import LIST_ACTION
from edgellm.manager.session import Session
from edgellm.manager.store import KeyValueStore
from edgellm.manager.sys_service import SysService
from edgellm.manager.sysinfo import HwInfo
from edgellm.manager.units import UnitRegistry, UnitTask

log = logging.getLogger(__name__)

DEAD_UNIT_GRACE = 0.1
"""Seconds the answers of a unit whose process is gone get to arrive: what it sent before it
died is already in this process's socket buffers."""

REBOOT_DELAY = 0.2
"""Seconds between the answer to ``reboot`` and its command (StackFlow waits as long)."""

DEAD_UNIT_PROBE = 0.5
"""Seconds a unit whose task lost its subscriber gets to answer ``list_action``."""

class ManagerRunning(RuntimeError):
    """Another unit manager already answers at this runtime dir's ``rpc.sys``."""


class UnitManager:
    """Start with ``await start()`` inside a running loop; ``await stop()`` (idempotent).

    ``clock``: wall-clock seconds for the ``created`` of the manager's own answers.
    """

    def __init__(self, config: ManagerConfig, *, clock=time.time):
        self.config = config
        self.store = KeyValueStore(
            {
                "config_zmq_s_format": config.zmq_s_format,
                "config_zmq_c_format": config.zmq_c_format,
                sys_rpc.BOX_NAME_KEY: config.box_name,
            }
        )
        self.sessions: set[Session] = set()
        self.sys_url = rpc_url("sys", config.runtime_dir)
        self.port: int | None = None
        self.registry: UnitRegistry | None = None
        self.leases: UnitLeases | None = None
        self._clock = clock
        self._ids = ConnectionIds()
        self._dispatcher: Dispatcher | None = None
        self._listener: Listener | None = None
        self._sys: AsyncRpcServer | None = None
        self._background: set[asyncio.Task] = set()  # probes, a reboot: cancelled by stop()
        self._started = False
        self._stopped = False

    async def start(self) -> "UnitManager":
        """Bind everything; raises :class:`ManagerRunning` or ``OSError`` (nothing left bound)."""
        if self._started:
            raise RuntimeError("UnitManager already started")
        self._started = True
        loop = asyncio.get_running_loop()
        if probe(self.sys_url) is not None:
            await self.stop()
            raise ManagerRunning(f"a unit manager already serves {self.sys_url}")
        config = self.config
        self.registry = UnitRegistry(config, loop, self.store, on_detach=self._on_detach)
        self.leases = UnitLeases(self.registry.ports, self.store, config.runtime_dir,
                                 config.orphan_timeout)  # fmt: skip
        self.leases.watch(loop)
        self._dispatcher = Dispatcher(config, self.registry, self.store, HwInfo(), self._clock,
                                      reboot=self._reboot_soon)  # fmt: skip
        try:
            sys_service = SysService(self.registry, self.store, self.leases)
            self._sys = AsyncRpcServer(loop, self.sys_url, sys_service.dispatcher(),
                                       dir_mode=config.ipc_mode).start()  # fmt: skip
            if config.enable_tcp:
                handle, live, ids, clock = self._dispatcher.handle, self.sessions, self._ids, self._clock
                closed = self._on_session_closed
                self._listener = Listener(loop, config.host, config.port, config.listen_backlog,
                                          lambda: Session(config, loop, ids, handle, live, clock,
                                                          closed))  # fmt: skip
                self.port = self._listener.start().port
        except BaseException:
            await self.stop()
            raise
        log.info("unit manager serving %s, tcp %s:%s", self.sys_url, config.host, self.port)
        return self

    def _reboot_soon(self) -> None:
        """``sys`` ``reboot`` (allowed by the operator): its answer goes out first, then
        ``reboot_command`` runs in a session of its own; its exit status is logged."""
        loop = asyncio.get_running_loop()

        async def run() -> None:
            await asyncio.sleep(REBOOT_DELAY)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *shlex.split(self.config.reboot_command), start_new_session=True,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
            except OSError as exc:
                log.error("reboot command %r failed to start: %s", self.config.reboot_command, exc)
                return
            log.warning("reboot command %r exited with %s", self.config.reboot_command,
                        await proc.wait())  # fmt: skip

        task = loop.create_task(run(), name="reboot")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_detach(self, task: UnitTask) -> None:
        for session in list(self.sessions):
            session.pending.detach(task.work_id, DETACH_GRACE)
        if not self._stopped:
            probe = asyncio.get_running_loop().create_task(self._confirm_gone(task))
            self._background.add(probe)
            probe.add_done_callback(self._background.discard)

    async def _confirm_gone(self, task: UnitTask) -> None:
        """A task's subscriber left. If its unit's process is gone too (nothing accepts at
        ``rpc.<unit>``: known at once), what it had in flight will never come: its requests
        fail after ``DEAD_UNIT_GRACE`` instead of ``DETACH_GRACE``. A unit that is alive
        closed the task itself, and its last answers are on their way."""
        client = AsyncRpcClient(task.unit, timeout=DEAD_UNIT_PROBE,
                                runtime_dir=self.config.runtime_dir)  # fmt: skip
        try:
            await client.call(LIST_ACTION)
            return
        except RpcUnavailable as exc:
            log.warning("%s: its unit is gone (%s)", task.work_id, exc)
        except CommError:
            return  # alive, only slow: the longer grace holds
        finally:
            client.close()
        for session in list(self.sessions):
            session.pending.detach(task.work_id, DEAD_UNIT_GRACE)

    def _on_session_closed(self, session: Session) -> None:
        """A connection closed: the tasks it set up end (a client that disconnects
        mid-generation stops it: the unit sees the task's inference link go)."""
        assert self.registry is not None
        for work_id in session.tasks:
            if self.registry.release(work_id):
                log.info("released %s: the connection that set it up closed", work_id)

    async def stop(self) -> None:
        """Close every session and socket and remove every file created; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._listener is not None:
            self._listener.close()
        for job in list(self._background):
            job.cancel()
        calls = [session.call for session in self.sessions if session.call is not None]
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()
            session.close()  # cancels the session's unit call, if one is in flight
        if self.leases is not None:
            self.leases.close()
        if self.registry is not None:
            self.registry.close()
        if self._dispatcher is not None:
            self._dispatcher.close()  # ends the waits of unit calls still in flight
        if self._sys is not None:
            self._sys.close()
        if calls:
            await asyncio.wait(calls, timeout=0.5)
        await asyncio.sleep(0)  # the aborted transports' connection_lost callbacks run
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
    except (ManagerRunning, OSError) as exc:  # OSError: EndpointError too
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
