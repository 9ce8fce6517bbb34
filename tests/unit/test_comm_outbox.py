import os

import pytest
import zmq

from edgellm.comm.outbox import Outbox

pytestmark = pytest.mark.usefixtures("no_endpoint_left")


def test_delivers_and_reuses_one_endpoint_per_url(runtime_dir, sockets):
    url = f"ipc://{runtime_dir}/client.sock"
    pull = sockets(zmq.PULL)
    pull.bind(url)
    outbox = Outbox()
    try:
        for i in range(3):
            assert outbox.send(url, b"m%d" % i)
        assert [pull.recv() for _ in range(3)] == [b"m0", b"m1", b"m2"]
        assert outbox.urls() == [url]
    finally:
        outbox.close()


def test_a_dead_client_never_blocks_the_sender(runtime_dir, caplog):
    outbox = Outbox()
    url = f"ipc://{runtime_dir}/gone.sock"  # nobody bound there
    try:
        results = [outbox.send(url, b"x") for _ in range(3000)]
        assert results[0] is True  # queued while it might still come
        assert results[-1] is False  # the high-water mark reached: dropped, not blocked
        assert outbox.dropped == results.count(False) > 0
        assert outbox.send("not a url", b"x") is False
    finally:
        outbox.close()
    assert caplog.text.count(f"reply to {url} dropped") == 1  # once per url, not per message
    assert not os.path.exists(f"{runtime_dir}/gone.sock")


def test_least_recently_used_urls_are_closed(runtime_dir):
    outbox = Outbox(max_urls=2)
    try:
        for name in ("a", "b", "a", "c"):
            outbox.send(f"ipc://{runtime_dir}/{name}.sock", b"x")
        assert outbox.urls() == [f"ipc://{runtime_dir}/a.sock", f"ipc://{runtime_dir}/c.sock"]
    finally:
        outbox.close()
