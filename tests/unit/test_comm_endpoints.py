"""Endpoint types against raw peers: roles, ipc files and their modes, errors, sends that
never block, draining, monitors."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import zmq

from edgellm.comm.endpoints import (
    Dealer,
    LinkEvent,
    Pub,
    Pull,
    Push,
    Router,
    Sub,
    XPub,
    open_endpoints,
    wait_for_events,
)
from edgellm.comm.errors import CommError, EndpointError

pytestmark = pytest.mark.usefixtures("no_endpoint_left")


def test_roles_bind_or_connect_and_a_bound_ipc_file_is_private(runtime_dir, sockets):
    url = f"ipc://{runtime_dir}/sub/dir/pull.sock"
    with Pull(url) as pull:
        assert pull.bound and pull in open_endpoints()
        path = url[len("ipc://"):]
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with Push(url) as push:
            assert not push.bound
            assert push.send(b"hi")
            assert pull.poll(5) and pull.drain(10) == [b"hi"]
    assert not os.path.exists(path)
    assert pull.closed and pull not in open_endpoints()
    pull.close()  # twice: nothing happens


def test_close_leaves_a_file_that_another_process_bound_since(runtime_dir, sockets):
    url = f"ipc://{runtime_dir}/shared.sock"
    first = Pub(url)
    successor = sockets(zmq.PUB)
    successor.bind(url)  # a restarted peer takes the path over
    first.close()
    assert os.path.exists(url[len("ipc://"):])


def test_a_bind_failure_is_an_endpoint_error_an_oserror_with_errno(bound):
    _, port = bound(zmq.ROUTER)
    with pytest.raises(EndpointError) as raised:
        Router(f"tcp://127.0.0.1:{port}")
    assert raised.value.errno == errno.EADDRINUSE
    assert isinstance(raised.value, OSError) and isinstance(raised.value, CommError)
    with pytest.raises(EndpointError):
        Dealer("no-scheme-at-all")


def test_bind_is_configuration_and_the_bound_port_is_reported(bound, sockets):
    with Pub("tcp://127.0.0.1:*") as pub:
        port = int(pub.last_endpoint.rsplit(":", 1)[1])
        assert port > 0 and pub.bound
    sub, port = bound(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    with Pub(f"tcp://127.0.0.1:{port}", bind=False) as pub:  # a PUB that connects
        assert not pub.bound
        while not sub.poll(20):
            pub.send(b"x")
        assert sub.recv() == b"x"


def test_sends_never_block_on_a_missing_peer(runtime_dir):
    with Push(f"ipc://{runtime_dir}/nobody.sock", sndhwm=10) as push:
        results = [push.send(b"x") for _ in range(100)]
    assert results[0] is True and results[-1] is False


def test_drain_takes_at_most_limit_messages(runtime_dir, sockets):
    with Pull(f"ipc://{runtime_dir}/drain.sock") as pull:
        push = sockets(zmq.PUSH)
        push.connect(pull.url)
        for i in range(5):
            push.send_multipart([b"m", b"%d" % i])
        assert pull.poll(5)
        got: list[list[bytes]] = []
        while len(got) < 5:
            batch = pull.drain_multipart(2)
            assert len(batch) <= 2
            got += batch
            pull.poll(1)
        assert got == [[b"m", b"%d" % i] for i in range(5)]
        assert pull.drain(10) == [] and not pull.has_input()


def test_a_sub_takes_every_topic_and_an_xpub_sees_it_come_and_go(runtime_dir):
    url = f"ipc://{runtime_dir}/xpub.sock"
    with XPub(url) as xpub:
        sub = Sub(url)
        assert xpub.poll(5) and xpub.drain(1) == [b"\x01"]  # subscribed to everything
        xpub.send(b"any topic")
        assert sub.poll(5) and sub.drain(1) == [b"any topic"]
        sub.close()
        assert xpub.poll(5) and xpub.drain(1) == [b"\x00"]


def test_a_monitor_reports_the_handshake_and_waiting_names_the_late(runtime_dir):
    with Pub(f"ipc://{runtime_dir}/mon.sock") as pub:
        up = Sub(pub.url, monitor=LinkEvent.HANDSHAKE_SUCCEEDED)
        down = Sub(f"ipc://{runtime_dir}/nobody.sock", monitor=LinkEvent.HANDSHAKE_SUCCEEDED)
        assert wait_for_events({up.link_monitor: "up", down.link_monitor: "down"}, 0.5) == ["down"]
        assert up.link_monitor is not None
        up.unmonitor()
        up.unmonitor()
        assert up.link_monitor is None
        up.close()
        down.close()  # with its monitor
