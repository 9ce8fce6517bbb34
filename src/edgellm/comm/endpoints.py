"""The process's ZeroMQ context and the endpoint types of the comm layer.

One context per process (:func:`context`); every socket is an :class:`Endpoint`, one
socket bound or connected to one url, of a type that fixes its role:

========  =======  ===============================================================
type      default  used for
========  =======  ===============================================================
Pub       bind     a task's output url; a KV event publisher (which may connect)
XPub      bind     the manager's inference urls (it sees subscribers come and go)
Sub       connect  a task's inputs; a KV event subscriber (every topic)
Push      connect  answers to a client's ``zmq_com`` (:mod:`edgellm.comm.outbox`)
Pull      bind     the manager's inbox of one TCP connection
Router    bind     RPC services; KV event replay
Dealer    connect  KV event replay requests
Req       connect  RPC calls
========  =======  ===============================================================

Bind or connect is the type's role unless ``bind=`` says otherwise: configuration, never
guessed from the url. Connecting endpoints retry every 100 ms, backing off to 1 s.

An endpoint belongs to the thread (:class:`~edgellm.comm.loop.SocketThread`) or asyncio
loop (:mod:`edgellm.comm.aio`) that made it. Sends never block: ``send`` answers False
when the message cannot be queued now. ``close()`` is idempotent (``linger`` 0 unless
given) and removes a bound ``ipc://`` file, if it is still the one this endpoint bound.
A url that cannot be bound or connected raises :class:`~edgellm.comm.errors.EndpointError`.
"""

from __future__ import annotations

import enum
import logging
import os
import time
import weakref
from typing import ClassVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from edgellm.comm.curve import Curve, CurveServer, hold_authenticator, release_authenticator
from edgellm.comm.errors import EndpointError
from edgellm.comm.urls import bind as bind_url
from edgellm.comm.urls import ipc_path

log = logging.getLogger(__name__)

RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000

# Plain ints: zmq's enum flags cost microseconds per call on the hot paths.
NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def context() -> zmq.Context:
    """The process's ZeroMQ context (a forked child gets its own)."""
    return zmq.Context.instance()


_open: "weakref.WeakSet[Endpoint]" = weakref.WeakSet()


def open_endpoints() -> list["Endpoint"]:
    """The endpoints of this process not closed yet (for diagnostics and tests)."""
    return [endpoint for endpoint in list(_open) if not endpoint.closed]


class LinkEvent(enum.IntFlag):
    """Connection events an endpoint's :class:`Monitor` reports."""

    CONNECTED = int(zmq.EVENT_CONNECTED)
    DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
    CONNECT_RETRIED = int(zmq.EVENT_CONNECT_RETRIED)
    HANDSHAKE_SUCCEEDED = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)


class Endpoint:
    """One socket bound or connected to one url (see the module docstring).

    ``sndhwm`` / ``rcvhwm``: high-water marks (ZeroMQ's default 1000 when None);
    ``ipv6``: a tcp endpoint listens on / reaches both stacks; ``dir_mode``: mode of an
    ipc directory this creates (its socket file gets the same without execute bits);
    ``monitor``: connection events to report (:attr:`link_monitor`), watched from before
    the bind or connect, so the first connection's events are never missed;
    ``reconnect_max``: longest wait between two connect attempts, seconds (1); ``curve``: CURVE
    authentication and encryption (:mod:`edgellm.comm.curve`), a server's keys on a socket
    that binds, a client's on one that connects.
    """

    kind: ClassVar[int]
    binds: ClassVar[bool] = False

    def __init__(self, url: str, *, bind: bool | None = None, dir_mode: int = 0o700,
                 sndhwm: int | None = None, rcvhwm: int | None = None,
                 ipv6: bool = False, monitor: LinkEvent | None = None,
                 reconnect_max: float | None = None,
                 curve: Curve | None = None) -> None:  # fmt: skip
        self.url = url
        self.bound = type(self).binds if bind is None else bind
        self._file: tuple[int, int] | None = None
        self._monitor: Monitor | None = None
        self._curve_server: CurveServer | None = None
        sock = context().socket(self.kind)
        try:
            sock.linger = 0
            if sndhwm is not None:
                sock.sndhwm = sndhwm
            if rcvhwm is not None:
                sock.rcvhwm = rcvhwm
            if ipv6:
                sock.ipv6 = True
            if curve is not None:
                curve.apply(sock)
                if isinstance(curve, CurveServer):
                    hold_authenticator(curve, context())  # before the bind: no one unasked
                    self._curve_server = curve
            self._configure(sock)
            if monitor is not None:
                self._monitor = Monitor(sock, monitor)
            if self.bound:
                bind_url(sock, url, dir_mode)
                self._file = _file_identity(url)
            else:
                sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS if reconnect_max is None
                                else max(RECONNECT_IVL_MS, int(reconnect_max * 1000)))  # fmt: skip
                sock.connect(url)
        except zmq.ZMQError as exc:
            self._abandon(sock)
            verb = "bind" if self.bound else "connect"
            raise EndpointError(exc.errno, f"cannot {verb} {url}: {exc}") from exc
        except BaseException:
            self._abandon(sock)
            raise
        self.socket = sock
        self._closed = False
        _open.add(self)

    def _configure(self, sock: zmq.Socket) -> None:
        """Options of the type, set before bind/connect."""

    def _abandon(self, sock: zmq.Socket) -> None:
        if self._monitor is not None:
            self._monitor.close()
        sock.close(linger=0)
        self._release_curve()

    def _release_curve(self) -> None:
        if self._curve_server is not None:
            release_authenticator(self._curve_server)
            self._curve_server = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fd(self) -> int:
        """A file descriptor that becomes readable when the socket's events may have
        changed (edge-triggered: check :meth:`has_input` after every operation)."""
        return self.socket.FD

    @property
    def last_endpoint(self) -> str:
        """The url as bound (``tcp://127.0.0.1:*`` -> the port the OS picked)."""
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def has_input(self) -> bool:
        """A message can be received now."""
        return bool(self.socket.getsockopt(_EVENTS) & _POLLIN)

    def poll(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until a message can be received."""
        return bool(self.socket.poll(max(0, int(timeout * 1000)), _POLLIN))

    def send(self, frame: bytes, *, copy: bool = True) -> bool:
        """Queue one message; False if it cannot be queued now (high-water mark, no peer)."""
        return self._send(self.socket.send, frame, copy)

    def send_multipart(self, frames, *, copy: bool = True) -> bool:
        """As :meth:`send`, for a message of several frames."""
        return self._send(self.socket.send_multipart, frames, copy)

    def _send(self, send, message, copy: bool) -> bool:
        try:
            send(message, NOBLOCK, copy=copy)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise EndpointError(exc.errno, f"send on {self.url}: {exc}") from exc

    def drain(self, limit: int) -> list[bytes]:
        """Up to ``limit`` one-frame messages that can be received now."""
        return self._drain(self.socket.recv, limit)

    def drain_multipart(self, limit: int) -> list[list[bytes]]:
        """Up to ``limit`` messages (their frames) that can be received now."""
        return self._drain(self.socket.recv_multipart, limit)

    def _drain(self, recv, limit: int) -> list:
        out: list = []
        getsockopt = self.socket.getsockopt
        try:
            # Asking first is cheaper than the zmq.Again that would end every drain.
            while len(out) < limit and getsockopt(_EVENTS) & _POLLIN:
                out.append(recv(NOBLOCK))
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            if not out:
                raise EndpointError(exc.errno, f"recv on {self.url}: {exc}") from exc
        return out

    @property
    def link_monitor(self) -> "Monitor | None":
        """The endpoint's :class:`Monitor`, if it has one."""
        return self._monitor

    def unmonitor(self) -> None:
        """Stop reporting connection events; safe to call twice."""
        if self._monitor is not None:
            if not self._closed:
                self.socket.disable_monitor()
            self._monitor.close()
            self._monitor = None

    def close(self, linger: int = 0) -> None:
        """Close the socket and remove a bound ipc file still ours; safe to call twice."""
        if self._closed:
            return
        self.unmonitor()
        self._closed = True
        _open.discard(self)
        self.socket.close(linger=linger)
        self._release_curve()
        if self._file is not None and _file_identity(self.url) == self._file:
            try:
                os.unlink(ipc_path(self.url))  # type: ignore[arg-type]
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("bound" if self.bound else "connected")
        return f"<{type(self).__name__} {self.url} {state}>"


class Monitor:
    """Connection events of one endpoint (asked for by its ``monitor=``, ended by
    :meth:`Endpoint.unmonitor` or the endpoint's close); belongs to the endpoint's thread."""

    def __init__(self, watched: zmq.Socket, events: LinkEvent) -> None:
        self.socket = watched.get_monitor_socket(int(events))
        self._closed = False

    @property
    def fd(self) -> int:
        return self.socket.FD

    def has_input(self) -> bool:
        """An event can be read now."""
        return not self._closed and bool(self.socket.getsockopt(_EVENTS) & _POLLIN)

    def events(self) -> list[LinkEvent]:
        """The events reported since the last call (none: an empty list)."""
        out = []
        while not self._closed and self.socket.poll(0):
            event = recv_monitor_message(self.socket)["event"]
            try:
                out.append(LinkEvent(event))
            except ValueError:  # an event not asked for (MONITOR_STOPPED...)
                continue
        return out

    def close(self) -> None:
        """Close the monitor's own socket (its endpoint stops reporting first)."""
        if not self._closed:
            self._closed = True
            self.socket.close(linger=0)


def wait_for_events(monitors: dict[Monitor, str], timeout: float) -> list[str]:
    """Wait until each monitor has reported an event, up to ``timeout`` seconds; returns
    the names of those that have not (sorted)."""
    pending = dict(monitors)
    deadline = time.monotonic() + timeout
    poller = zmq.Poller()
    for monitor in pending:
        poller.register(monitor.socket, zmq.POLLIN)
    by_socket = {monitor.socket: monitor for monitor in pending}
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for sock, _ in poller.poll(remaining * 1000):
            monitor = by_socket[sock]
            if monitor.events():
                poller.unregister(sock)
                pending.pop(monitor, None)
    return sorted(pending.values())


def _file_identity(url: str) -> tuple[int, int] | None:
    """(device, inode) of an ``ipc://`` endpoint's file; None if absent or not ipc."""
    path = ipc_path(url)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Pub(Endpoint):
    kind = zmq.PUB
    binds = True


class XPub(Endpoint):
    """Receives ``b"\\x01<topic>"`` when a subscriber arrives, ``b"\\x00<topic>"`` when
    it leaves (the same to a SUB as a PUB, C++ units included)."""

    kind = zmq.XPUB
    binds = True


class Sub(Endpoint):
    """Subscribed to every topic."""

    kind = zmq.SUB

    def _configure(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.SUBSCRIBE, b"")


class Push(Endpoint):
    kind = zmq.PUSH


class Pull(Endpoint):
    kind = zmq.PULL
    binds = True


class Router(Endpoint):
    kind = zmq.ROUTER
    binds = True


class Dealer(Endpoint):
    kind = zmq.DEALER


class Req(Endpoint):
    kind = zmq.REQ


__all__ = ["Dealer", "Endpoint", "LinkEvent", "Monitor", "Pub", "Pull", "Push", "Req",
           "Router", "Sub", "XPub", "context", "open_endpoints", "wait_for_events"]  # fmt: skip
