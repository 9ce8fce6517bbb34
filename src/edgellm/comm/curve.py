"""CURVE authentication and encryption of tcp endpoints between boxes (ZeroMQ's CurveZMQ,
with pyzmq's own ZAP authenticator), off unless configured.

Keys are files in ``zmq.auth.create_certificates``' format: ``NAME.key`` holds a public key,
``NAME.key_secret`` the public and the secret key (:func:`create_keypair` writes a pair).

- A server (a KV event publisher's PUB and replay ROUTER) has a keypair
  (:meth:`CurveServer.from_files`: its ``.key_secret``) and a directory of the public keys
  of the clients it lets in. Its sockets encrypt everything and ask the process's ZAP
  authenticator about every connecting client: a client whose public key is not in that
  directory is refused during the handshake and receives nothing.
- A client (a KV event subscriber's SUB and replay DEALER) has a keypair of its own (its
  ``.key_secret``, whose ``.key`` the servers' directories hold) and the server's public key
  (:meth:`CurveClient.from_files`); a server with another key never completes the
  handshake.

An endpoint takes one with ``curve=`` (:class:`~edgellm.comm.endpoints.Endpoint`); a server
one holds the process's authenticator (:func:`hold_authenticator`) from before its bind
until its close: the authenticator (a thread with an inproc socket, one per process) runs
while any server endpoint needs it. The clients' directory is read when the first endpoint
of that directory binds; keys added later are read by the next start.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


class CurveKeyError(ValueError):
    """A key file or directory that cannot be used (the message says which and why)."""


def _load(path: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise CurveKeyError(f"cannot read the CURVE key file {path}: {exc}") from None
    if secret and secret_key is None:
        raise CurveKeyError(f"{path} holds no secret key (give the .key_secret file)")
    return public, secret_key


@dataclass(frozen=True)
class CurveServer:
    """A server's keypair and the directory of the client keys it accepts."""

    public: bytes
    secret: bytes = field(repr=False)
    clients_dir: str

    @classmethod
    def from_files(cls, secret_file: str, clients_dir: str) -> "CurveServer":
        public, secret = _load(secret_file, secret=True)
        if not os.path.isdir(clients_dir):
            raise CurveKeyError(f"{clients_dir} is not a directory of client public keys")
        if not any(name.endswith(".key") for name in os.listdir(clients_dir)):
            log.warning("no client key (*.key) in %s: every subscriber will be refused",
                        clients_dir)  # fmt: skip
        return cls(public, secret, os.path.abspath(clients_dir))

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = self.clients_dir.encode()


@dataclass(frozen=True)
class CurveClient:
    """A client's keypair and the public key of the server it connects to."""

    public: bytes
    secret: bytes = field(repr=False)
    server_public: bytes

    @classmethod
    def from_files(cls, secret_file: str, server_key_file: str) -> "CurveClient":
        public, secret = _load(secret_file, secret=True)
        server_public, _ = _load(server_key_file, secret=False)
        return cls(public, secret, server_public)  # type: ignore[arg-type]

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


Curve = CurveServer | CurveClient


def create_keypair(directory: str, name: str) -> tuple[str, str]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``directory`` (created); returns their
    paths (public, secret)."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    return str(public), str(secret)


class _Authenticator:
    """The process's ZAP authenticator, held by the server endpoints that need it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._auth: ThreadAuthenticator | None = None
        self._holders: dict[str, int] = {}  # clients dir -> endpoints holding it

    def hold(self, clients_dir: str, ctx: zmq.Context) -> None:
        with self._lock:
            if self._auth is None:
                self._auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
                self._auth.start()
            if clients_dir not in self._holders:
                self._auth.configure_curve(domain=clients_dir, location=clients_dir)
            self._holders[clients_dir] = self._holders.get(clients_dir, 0) + 1

    def release(self, clients_dir: str) -> None:
        with self._lock:
            count = self._holders.get(clients_dir, 0) - 1
            if count > 0:
                self._holders[clients_dir] = count
                return
            self._holders.pop(clients_dir, None)
            if not self._holders and self._auth is not None:
                self._auth.stop()
                self._auth = None


_authenticator = _Authenticator()


def hold_authenticator(curve: CurveServer, ctx: zmq.Context) -> None:
    """Run the authenticator of ``ctx`` (the process's context) for ``curve``'s clients,
    until released."""
    _authenticator.hold(curve.clients_dir, ctx)


def release_authenticator(curve: CurveServer) -> None:
    """One holder fewer; the last one stops the authenticator."""
    _authenticator.release(curve.clients_dir)


__all__ = ["Curve", "CurveClient", "CurveKeyError", "CurveServer", "create_keypair",
           "hold_authenticator", "release_authenticator"]  # fmt: skip
