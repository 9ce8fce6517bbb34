"""PUSH sockets to clients' ``zmq_com`` urls, kept open and reused.

Upstream creates a ZeroMQ context and a PUSH socket for every message it sends; here a
thread keeps one :class:`Outbox` whose sockets stay connected, a few urls at a time
(least recently used closed first). Sends never block: a client that went away makes a
send fail (counted in ``dropped``) instead of stalling the task for the 3 s upstream
timeout. Closed sockets linger briefly so what is already queued still reaches a live
client.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import zmq

log = logging.getLogger(__name__)

RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000
CLOSE_LINGER_MS = 500


class Outbox:
    """PUSH sockets by url, owned by one thread. ``close()`` is idempotent."""

    def __init__(self, ctx: zmq.Context, max_urls: int = 8):
        self._ctx = ctx
        self._max_urls = max_urls
        self._socks: OrderedDict[str, zmq.Socket] = OrderedDict()
        self.dropped = 0
        self._warned: set[str] = set()

    def _socket(self, url: str) -> zmq.Socket:
        sock = self._socks.get(url)
        if sock is not None:
            self._socks.move_to_end(url)
            return sock
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        try:
            sock.connect(url)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self._socks[url] = sock
        while len(self._socks) > self._max_urls:
            old_url, old = self._socks.popitem(last=False)
            self._warned.discard(old_url)
            old.close()
        return sock

    def send(self, url: str, payload: bytes) -> bool:
        """Queue ``payload`` for ``url``; False if it cannot be delivered (logged once
        per url, so a dead client does not flood the log)."""
        try:
            self._socket(url).send(payload, zmq.NOBLOCK)
            return True
        except zmq.Again:
            reason = "client is not reading"
        except zmq.ZMQError as exc:
            reason = str(exc)
        self.dropped += 1
        if url not in self._warned:
            if len(self._warned) >= 1024:  # many distinct bad urls: forget, stay bounded
                self._warned.clear()
            self._warned.add(url)
            log.warning("reply to %s dropped: %s", url, reason)
        return False

    def close(self) -> None:
        while self._socks:
            _, sock = self._socks.popitem()
            sock.close()
