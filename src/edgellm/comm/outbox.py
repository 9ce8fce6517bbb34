"""PUSH endpoints to clients' ``zmq_com`` urls, kept open and reused.

Upstream creates a ZeroMQ context and a PUSH socket for every message it sends; here the
thread that answers clients keeps one :class:`Outbox` whose endpoints stay connected, a
few urls at a time (least recently used closed first). Sends never block: a client that
went away makes a send fail (counted in ``dropped``, logged once per url) instead of
stalling the thread for upstream's 3 s timeout. Closed endpoints linger briefly, so what
is already queued still reaches a live client.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from edgellm.comm.endpoints import Push
from edgellm.comm.errors import EndpointError

log = logging.getLogger(__name__)

CLOSE_LINGER_MS = 500


class Outbox:
    """PUSH endpoints by url, owned by one thread. ``close()`` is idempotent."""

    def __init__(self, max_urls: int = 8):
        self._max_urls = max_urls
        self._pushes: OrderedDict[str, Push] = OrderedDict()
        self.dropped = 0
        self._warned: set[str] = set()

    def _endpoint(self, url: str) -> Push:
        push = self._pushes.get(url)
        if push is not None:
            self._pushes.move_to_end(url)
            return push
        push = self._pushes[url] = Push(url)
        while len(self._pushes) > self._max_urls:
            old_url, old = self._pushes.popitem(last=False)
            self._warned.discard(old_url)
            old.close(linger=CLOSE_LINGER_MS)
        return push

    def send(self, url: str, payload: bytes) -> bool:
        """Queue ``payload`` for ``url``; False if it cannot be delivered."""
        try:
            if self._endpoint(url).send(payload):
                return True
            reason = "client is not reading"
        except EndpointError as exc:
            reason = str(exc)
        self.dropped += 1
        if url not in self._warned:
            if len(self._warned) >= 1024:  # many distinct bad urls: forget, stay bounded
                self._warned.clear()
            self._warned.add(url)
            log.warning("reply to %s dropped: %s", url, reason)
        return False

    def urls(self) -> list[str]:
        """The urls with an open endpoint, least recently used first."""
        return list(self._pushes)

    def close(self) -> None:
        while self._pushes:
            _, push = self._pushes.popitem()
            push.close(linger=CLOSE_LINGER_MS)


__all__ = ["Outbox"]
