"""The front door's listener in process: every connection is set up, in batches, accepting
pauses while too many wait and resumes; close() releases everything."""

from __future__ import annotations

import asyncio
import socket

import pytest

from edgellm.manager import listener as listener_module
from edgellm.manager.listener import Listener


class Recorder(asyncio.Protocol):
    made: list["Recorder"] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        Recorder.made.append(self)


@pytest.fixture(autouse=True)
def fresh():
    Recorder.made = []


def test_a_burst_is_set_up_in_batches_with_accepting_paused_while_too_many_wait(monkeypatch):
    monkeypatch.setattr(listener_module, "ADMIT_BATCH", 3)
    monkeypatch.setattr(listener_module, "MAX_WAITING", 8)
    pauses: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = Listener(loop, "127.0.0.1", 0, 128, Recorder).start()
        pause = listener._pause_accepting

        def counted_pause() -> None:
            pauses.append(len(listener._waiting))
            pause()

        listener._pause_accepting = counted_pause
        clients = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(40)]
        try:
            for _ in range(200):
                if len(Recorder.made) == 40:
                    break
                await asyncio.sleep(0.01)
            assert len(Recorder.made) == 40
            assert pauses and max(pauses) == 8  # it stopped accepting at MAX_WAITING
            assert listener._accepting  # and resumed
        finally:
            listener.close()
            for r in Recorder.made:
                r.transport.close()
            for c in clients:
                c.close()

    asyncio.run(main())


def test_close_releases_the_port_and_the_connections_not_set_up():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = Listener(loop, "127.0.0.1", 0, 128, Recorder).start()
        port = listener.port
        client = socket.create_connection(("127.0.0.1", port))
        listener._accept(listener.sockets[0])  # accepted, not yet set up
        assert len(listener._waiting) == 1
        listener.close()
        listener.close()
        client.settimeout(5)
        assert client.recv(1) == b""  # closed by the listener
        client.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        await asyncio.sleep(0.05)
        assert Recorder.made == []

    asyncio.run(main())
