import os

import zmq

from edgellm.unit.outbox import Outbox


def test_delivers_and_reuses_one_socket_per_url(tmp_path):
    ctx = zmq.Context()
    url = f"ipc://{tmp_path}/client.sock"
    pull = ctx.socket(zmq.PULL)
    pull.bind(url)
    outbox = Outbox(ctx)
    try:
        for i in range(3):
            assert outbox.send(url, b"m%d" % i)
        assert [pull.recv() for _ in range(3)] == [b"m0", b"m1", b"m2"]
        assert len(outbox._socks) == 1
    finally:
        outbox.close()
        pull.close(linger=0)
        ctx.term()


def test_a_dead_client_never_blocks_the_sender(tmp_path):
    ctx = zmq.Context()
    outbox = Outbox(ctx)
    url = f"ipc://{tmp_path}/gone.sock"  # nobody bound there
    try:
        results = [outbox.send(url, b"x") for _ in range(3000)]
        assert results[0] is True  # queued while it might still come
        assert results[-1] is False  # the high-water mark reached: dropped, not blocked
        assert outbox.dropped == results.count(False) > 0
        assert outbox.send("not a url", b"x") is False
    finally:
        outbox.close()
        for sock in list(outbox._socks.values()):
            sock.close(linger=0)
        ctx.destroy(linger=0)
    assert not os.path.exists(f"{tmp_path}/gone.sock")


def test_least_recently_used_urls_are_closed(tmp_path):
    ctx = zmq.Context()
    outbox = Outbox(ctx, max_urls=2)
    try:
        for name in ("a", "b", "a", "c"):
            outbox.send(f"ipc://{tmp_path}/{name}.sock", b"x")
        assert list(outbox._socks) == [f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/c.sock"]
    finally:
        outbox.close()
        ctx.destroy(linger=0)
