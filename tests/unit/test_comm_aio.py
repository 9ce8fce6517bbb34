"""Endpoints on an asyncio loop: a Watch calls back while active and catches up on what
queued while paused; wait_readable times out, and its owner can end it."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from edgellm.comm.aio import Watch, wait_readable
from edgellm.comm.endpoints import Pull, XPub
from edgellm.comm.errors import CommError

pytestmark = pytest.mark.usefixtures("no_endpoint_left")


def test_a_watch_reads_while_active_and_catches_up_on_resume(runtime_dir, sockets):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        pull = Pull(f"ipc://{runtime_dir}/watched.sock")
        got: list[bytes] = []
        arrived = asyncio.Event()

        def on_readable() -> None:
            got.extend(pull.drain(100))
            arrived.set()

        watch = Watch(loop, pull, on_readable)
        push = sockets(zmq.PUSH)
        push.connect(pull.url)
        watch.resume()
        push.send(b"one")
        await asyncio.wait_for(arrived.wait(), 5)
        assert got == [b"one"]
        watch.pause()
        arrived.clear()
        push.send(b"two")
        assert pull.poll(5)  # queued in ZeroMQ, not read: the watch is paused
        assert got == [b"one"] and not arrived.is_set()
        watch.resume()  # what queued meanwhile is handled at once
        assert got == [b"one", b"two"]
        watch.close()
        watch.close()
        assert pull.closed

    asyncio.run(main())


def test_poke_handles_input_that_arrived_while_the_loop_was_busy(runtime_dir, sockets):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        xpub = XPub(f"ipc://{runtime_dir}/xpub.sock")
        seen: list[bytes] = []
        watch = Watch(loop, xpub, lambda: seen.extend(xpub.drain(10)))
        for topic in (b"", b"t"):
            sub = sockets(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, topic)
            sub.connect(xpub.url)
        # The loop never runs from here on: only resume() and poke() can tell the watch.
        assert xpub.poll(5)  # a socket operation: it may consume the fd's edge
        watch.poke()
        assert seen == []  # not active yet: nothing is read
        watch.resume()  # what queued meanwhile is handled at once
        while len(seen) < 2:
            assert xpub.poll(5)
            watch.poke()
        assert sorted(seen) == [b"\x01", b"\x01t"]
        watch.close()

    asyncio.run(main())


def test_wait_readable_times_out_and_can_be_ended_by_its_owner(runtime_dir):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with Pull(f"ipc://{runtime_dir}/quiet.sock") as pull:
            assert await wait_readable(loop, pull, 0.05) is False
            waiters: set[asyncio.Future] = set()
            waiting = asyncio.ensure_future(wait_readable(loop, pull, 30, waiters))
            while not waiters:
                await asyncio.sleep(0)
            next(iter(waiters)).set_exception(CommError("closed"))
            with pytest.raises(CommError):
                await asyncio.wait_for(waiting, 5)
            assert not waiters

    asyncio.run(main())
