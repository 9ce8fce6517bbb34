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

import os
import queue
import threading

import zmq


class DroppingRelay:
    def __init__(self, upstream: str, *, ctx: zmq.Context | None = None):
        self.upstream = upstream
        self.drop: set[int] = set()
        self.forwarded: list[int] = []
        self.dropped: list[int] = []
        self._ctx = ctx or zmq.Context.instance()
        self._ready = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self._control: queue.SimpleQueue = queue.SimpleQueue()
        self.port: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="drop-relay")

    def start(self) -> "DroppingRelay":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def pause(self) -> None:
        self._command(("pause",))

    def resume(self) -> None:
        self._command(("resume",))

    def inject(self, frames: list[bytes]) -> None:
        self._command(("inject", frames))

    def _command(self, cmd: tuple) -> None:
        done = threading.Event()
        self._control.put((cmd, done))
        os.write(self._stop_w, b"c")
        assert done.wait(10), "relay did not take the command"

    def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        pub = self._ctx.socket(zmq.PUB)
        sub.linger = pub.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.upstream)
        self.port = pub.bind_to_random_port("tcp://127.0.0.1")
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(self._stop_r, zmq.POLLIN)
        paused: list[list[bytes]] | None = None
        try:
            while True:
                ready = dict(poller.poll())
                if self._stop_r in ready:
                    if os.read(self._stop_r, 1) == b"x":
                        return
                    (kind, *args), done = self._control.get()
                    if kind == "pause":
                        paused = []
                    elif kind == "resume":
                        for frames in paused or ():
                            pub.send_multipart(frames)
                        paused = None
                    elif paused is not None:
                        paused.append(args[0])
                    else:
                        pub.send_multipart(args[0])
                    done.set()
                if sub in ready:
                    frames = sub.recv_multipart()
                    seq = int.from_bytes(frames[1], "big")
                    if seq in self.drop:
                        self.dropped.append(seq)
                        continue
                    self.forwarded.append(seq)
                    if paused is not None:
                        paused.append(frames)
                    else:
                        pub.send_multipart(frames)
        finally:
            sub.close(linger=0)
            pub.close(linger=0)

    def stop(self) -> None:
        if self._stop_w < 0:
            return
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(10)
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._stop_r = self._stop_w = -1

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
