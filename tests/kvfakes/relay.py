"""A live-stream relay that drops chosen batches: a lossy network between PUB and SUB.

SUB (connected to the publisher) -> PUB (bound on a free loopback port); batches whose
sequence number is in ``drop`` are not forwarded. Replay requests do not pass through it
(the pod's router port points at the publisher itself), exactly like a network that loses
some PUB traffic.

``pause()`` queues what arrives (a stalled link or a subscriber paused by the OS) until
``resume()`` forwards it in order; ``inject(frames)`` sends frames of our own, in order
with the forwarded ones (a corrupted or foreign message on the wire).
"""

from __future__ import annotations

from edgellm.comm.endpoints import Pub, Sub
from edgellm.comm.loop import SocketThread


class DroppingRelay(SocketThread):
    def __init__(self, upstream: str):
        super().__init__("drop-relay")
        self.upstream = upstream
        self.drop: set[int] = set()
        self.forwarded: list[int] = []
        self.dropped: list[int] = []
        self.port: int | None = None
        self._paused: list[list[bytes]] | None = None

    def setup(self) -> None:
        self._sub = self.open(Sub, self.upstream)
        self._pub = self.open(Pub, "tcp://127.0.0.1:*")
        self.port = int(self._pub.last_endpoint.rsplit(":", 1)[1])
        self.add_reader(self._sub, self._relay)

    def pause(self) -> None:
        self._command(self._pause)

    def resume(self) -> None:
        self._command(self._resume)

    def inject(self, frames: list[bytes]) -> None:
        self._command(self._forward, frames)

    def _command(self, fn, *args) -> None:
        self.submit(fn, *args).result(10)  # done in order with what is being relayed

    def _pause(self) -> None:
        self._paused = []

    def _resume(self) -> None:
        paused, self._paused = self._paused or [], None
        for frames in paused:
            self._pub.send_multipart(frames)

    def _forward(self, frames: list[bytes]) -> None:
        if self._paused is not None:
            self._paused.append(frames)
        else:
            self._pub.send_multipart(frames)

    def _relay(self) -> None:
        for frames in self._sub.drain_multipart(1000):
            seq = int.from_bytes(frames[1], "big")
            if seq in self.drop:
                self.dropped.append(seq)
                continue
            self.forwarded.append(seq)
            self._forward(frames)
