"""The one client of the unit manager's ``sys`` RPC service: units, discovery and the
gateway all call it through :class:`SysClient` (wire: :mod:`edgellm.protocol.sys_rpc`).

The unit manager may start after the caller or restart under it, so every call retries
with exponential backoff while the service is absent (no ipc file) or silent, until the
call's deadline; then :class:`~edgellm.comm.errors.SysUnavailable` is raised. A reply
that cannot be read raises :class:`~edgellm.comm.errors.SysError`. The REQ socket is
persistent; a client is meant for one thread (calls are serialised if shared).
"""

from __future__ import annotations

import logging
import time

from edgellm.comm.errors import CommError, RpcRemoteError, SysError, SysUnavailable
from edgellm.comm.rpc_thread import RpcClient
from edgellm.comm.urls import DEFAULT_RUNTIME_DIR
from edgellm.protocol import sys_rpc
from edgellm.protocol.sys_rpc import Registration

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.02
BACKOFF_MAX = 0.5


class SysClient:
    """Blocking sys RPC calls with retry and backoff; ``close()`` is idempotent.

    ``call_timeout`` bounds one attempt (upstream's 3 s REQ timeout); ``retry_deadline``
    bounds a whole call including retries (long enough to ride out a unit-manager
    restart); 0 means one attempt, no retry. ``service`` is ``sys`` or a url.
    """

    def __init__(self, *, runtime_dir: str = DEFAULT_RUNTIME_DIR, call_timeout: float = 3.0,
                 retry_deadline: float = 10.0,
                 service: str = sys_rpc.SYS_SERVICE) -> None:  # fmt: skip
        self.call_timeout = call_timeout
        self.retry_deadline = retry_deadline
        self._rpc = RpcClient(service, timeout=call_timeout, runtime_dir=runtime_dir)

    @property
    def url(self) -> str:
        return self._rpc.url

    def call(self, action: str, data: bytes | str = b"", *, deadline: float | None = None) -> bytes:
        """One sys action, retried while the service is absent or silent; its reply.

        ``deadline`` is seconds from now (default ``retry_deadline``). Raises
        :class:`SysUnavailable` when it passes without an answer and :class:`SysError`
        when the service's handler failed.
        """
        end = time.monotonic() + (self.retry_deadline if deadline is None else deadline)
        delay = BACKOFF_FIRST
        attempt = 0
        while True:
            attempt += 1
            remaining = end - time.monotonic()
            try:
                return self._rpc.call(
                    action, data, timeout=max(0.05, min(self.call_timeout, remaining))
                )
            except RpcRemoteError as exc:
                raise SysError(str(exc)) from exc
            except CommError as exc:
                if not exc.retriable:
                    raise SysError(f"sys {action!r}: {exc}") from exc
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise SysUnavailable(
                        f"sys {action!r} failed after {attempt} attempt(s): {exc}"
                    ) from exc
                log.debug("sys %s attempt %d failed (%s); retrying", action, attempt, exc)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, BACKOFF_MAX)

    def register_unit(self, unit: str, *, deadline: float | None = None) -> Registration:
        """Allocate a work id and its two urls for a new task of ``unit``."""
        reply = self.call(sys_rpc.REGISTER_UNIT, unit, deadline=deadline)
        try:
            return sys_rpc.decode_registration(unit, reply)
        except sys_rpc.SysReplyError as exc:
            raise SysError(str(exc)) from None

    def release_unit(self, work_id: str, *, deadline: float | None = None) -> None:
        self.call(sys_rpc.RELEASE_UNIT, work_id, deadline=deadline)

    def sql_select(self, key: str, *, deadline: float | None = None) -> str:
        """The value stored under ``key``; empty string if none."""
        return sys_rpc.text(self.call(sys_rpc.SQL_SELECT, key, deadline=deadline))

    def sql_set(self, key: str, val: str, *, deadline: float | None = None) -> bool:
        """Store ``val`` under ``key``; False if the manager refused (empty key)."""
        reply = self.call(sys_rpc.SQL_SET, sys_rpc.encode_sql_set(key, val), deadline=deadline)
        return reply == sys_rpc.SUCCESS

    def sql_unset(self, key: str, *, deadline: float | None = None) -> None:
        self.call(sys_rpc.SQL_UNSET, key, deadline=deadline)

    def alloc_port(self, unit: str, port: int | None = None, *,
                   deadline: float | None = None) -> int | None:  # fmt: skip
        """A port of the manager's pool leased to ``unit`` (``port``: that one, e.g. re-claimed
        after a manager restart); None if refused, or if the manager leases no ports (a
        C++ one answers ``NotAction``)."""
        reply = self.call(sys_rpc.ALLOC_PORT, sys_rpc.encode_port_lease(unit, port),
                          deadline=deadline)  # fmt: skip
        return int(reply) if reply.isdigit() else None

    def release_port(self, unit: str, port: int, *, deadline: float | None = None) -> bool:
        """Give a leased port back; False if it was not ``unit``'s lease."""
        reply = self.call(sys_rpc.RELEASE_PORT, sys_rpc.encode_port_lease(unit, port),
                          deadline=deadline)  # fmt: skip
        return reply == sys_rpc.SUCCESS

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> "SysClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["Registration", "SysClient", "SysError", "SysUnavailable"]
