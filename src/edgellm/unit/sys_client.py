"""A unit's client of the unit manager's ``sys`` RPC service.

Wire (spec 1 §3.2, byte-faithful to the C++ ``StackFlow::sys_*`` helpers):

=============  ================================  ==========================================
action         request data                      reply
=============  ================================  ==========================================
register_unit  unit name (``llm``)               ``set_param(str(n), set_param(out, inf))``
release_unit   work id (``llm.3``)               ``Success``
sql_select     key                               value, empty if none
sql_set        ``{"key":..,"val":..}``           ``Success`` or ``False`` (empty key)
sql_unset      key                               ``Success``
=============  ================================  ==========================================

The unit manager may start after the unit or restart under it, so every call retries
with exponential backoff while the service is absent (no ipc file) or silent, until the
call's deadline; then :class:`SysUnavailable` is raised. The REQ socket is persistent and
belongs to the thread that owns this client (one client per thread).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import zmq

from edgellm.comm.rpc import RpcClient, RpcTimeout, RpcUnavailable
from edgellm.comm.urls import DEFAULT_RUNTIME_DIR
from edgellm.protocol.params import ParamError, split_params

log = logging.getLogger(__name__)

SYS_SERVICE = "sys"
BACKOFF_FIRST = 0.02
BACKOFF_MAX = 0.5


class SysError(Exception):
    """The sys service answered something this client cannot use."""


class SysUnavailable(SysError):
    """The sys service did not answer before the call's deadline."""


@dataclass(frozen=True)
class Registration:
    """What ``register_unit`` hands out: ``work_id`` = ``<unit>.<number>``."""

    unit: str
    number: int
    output_url: str
    inference_url: str

    @property
    def work_id(self) -> str:
        return f"{self.unit}.{self.number}"


class SysClient:
    """Blocking sys RPC calls with retry + backoff. Use from one thread; ``close()`` is idempotent.

    ``call_timeout`` bounds one attempt (upstream's 3 s REQ timeout); ``retry_deadline``
    bounds a whole call including retries (default: one attempt's timeout plus a few
    seconds, long enough to ride out a unit-manager restart).
    """

    def __init__(
        self,
        *,
        runtime_dir: str = DEFAULT_RUNTIME_DIR,
        call_timeout: float = 3.0,
        retry_deadline: float = 10.0,
        ctx: zmq.Context | None = None,
    ):
        self.call_timeout = call_timeout
        self.retry_deadline = retry_deadline
        self._rpc = RpcClient(SYS_SERVICE, timeout=call_timeout, runtime_dir=runtime_dir, ctx=ctx)

    @property
    def url(self) -> str:
        return self._rpc.url

    def call(self, action: str, data: bytes | str, *, deadline: float | None = None) -> bytes:
        """One sys action, retried while the service is absent or silent.

        ``deadline`` is seconds from now (default ``retry_deadline``); raises
        :class:`SysUnavailable` when it passes without an answer.
        """
        budget = self.retry_deadline if deadline is None else deadline
        end = time.monotonic() + budget
        delay = BACKOFF_FIRST
        attempt = 0
        while True:
            attempt += 1
            remaining = end - time.monotonic()
            try:
                return self._rpc.call(
                    action, data, timeout=max(0.05, min(self.call_timeout, remaining))
                )
            except (RpcUnavailable, RpcTimeout) as exc:
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
        reply = self.call("register_unit", unit, deadline=deadline)
        try:
            number_raw, urls = split_params(reply)
            output_url, inference_url = split_params(urls)
            number = int(number_raw.decode("ascii"))
            return Registration(
                unit, number, output_url.decode("utf-8"), inference_url.decode("utf-8")
            )
        except (ParamError, ValueError, UnicodeDecodeError) as exc:
            raise SysError(f"malformed register_unit reply {reply[:80]!r}") from exc

    def release_unit(self, work_id: str, *, deadline: float | None = None) -> None:
        self.call("release_unit", work_id, deadline=deadline)

    def sql_select(self, key: str, *, deadline: float | None = None) -> str:
        """The value stored under ``key``; empty string if none."""
        return self.call("sql_select", key, deadline=deadline).decode("utf-8", "replace")

    def sql_set(self, key: str, val: str, *, deadline: float | None = None) -> bool:
        """Store ``val`` under ``key``; False if the manager refused (empty key)."""
        body = json.dumps({"key": key, "val": val}, separators=(",", ":"), ensure_ascii=False)
        return self.call("sql_set", body, deadline=deadline) == b"Success"

    def sql_unset(self, key: str, *, deadline: float | None = None) -> None:
        self.call("sql_unset", key, deadline=deadline)

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> "SysClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
