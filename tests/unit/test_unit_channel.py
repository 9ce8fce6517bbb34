"""A task's channel in process: the loss of its own inference url's connection is reported
once, on the task's worker."""

from __future__ import annotations

import threading

import pytest
import zmq

from edgellm.unit.channel import TaskChannel

pytestmark = pytest.mark.usefixtures("no_endpoint_left")


def test_the_task_hears_once_on_its_worker_that_its_inference_url_went_away(runtime_dir, sockets):
    inference = sockets(zmq.XPUB)  # the manager's side of the task
    inference.bind(f"ipc://{runtime_dir}/inference")
    upstream = sockets(zmq.PUB)  # another task's output the task takes as input
    upstream.bind(f"ipc://{runtime_dir}/upstream")
    heard: list[str] = []
    lost = threading.Event()

    def on_lost() -> None:
        heard.append(threading.current_thread().name)
        lost.set()

    channel = TaskChannel("t.0", f"ipc://{runtime_dir}/output")
    channel.start(lambda source, raw: None, on_lost=on_lost)
    try:
        late = channel.submit(channel.subscribe, {"": f"ipc://{runtime_dir}/inference",
                                                  "up.1": f"ipc://{runtime_dir}/upstream"},
                              5).result(10)  # fmt: skip
        assert late == []
        upstream.close(linger=0)  # an input going away: the task lives on
        inference.close(linger=0)  # its own link going away: the task's end
        assert lost.wait(10)
        assert heard == ["task:t.0"]
        channel.submit(lambda: None).result(10)  # anything queued after it has run
        assert heard == ["task:t.0"]  # once
    finally:
        channel.stop()


def test_without_on_lost_the_own_link_is_not_watched(runtime_dir, sockets):
    inference = sockets(zmq.XPUB)
    inference.bind(f"ipc://{runtime_dir}/inference")
    channel = TaskChannel("t.1", f"ipc://{runtime_dir}/output")
    channel.start(lambda source, raw: None)
    try:
        assert channel.submit(channel.subscribe, {"": f"ipc://{runtime_dir}/inference"},
                              5).result(10) == []  # fmt: skip
        sub = channel.submit(lambda: channel._subs[""]).result(10)
        assert sub.link_monitor is None  # unmonitored once connected
    finally:
        channel.stop()
