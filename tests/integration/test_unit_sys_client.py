"""The unit's sys client against a C++-faithful sys service: replies decoded exactly,
retries while the unit manager is absent or restarting, a clear error when it stays away."""

from __future__ import annotations

import logging
import threading

import pytest
import zmq
from test_interop_cpp_manager import CppStyleManager, cpp_manager  # noqa: F401

from edgellm.unit import Registration, SysClient, SysError, SysUnavailable


def test_register_and_release_decode_the_cpp_replies(cpp_manager, runtime_dir):
    with SysClient(runtime_dir=runtime_dir) as client:
        first = client.register_unit("llm")
        second = client.register_unit("asr")
        assert first == Registration(
            "llm", 0,
            f"ipc://{runtime_dir}/llm/5010.sock.llm.output_url",
            f"ipc://{runtime_dir}/llm/5011.sock.llm.inference_url",
        )
        assert (second.work_id, second.output_url) == (
            "asr.1", f"ipc://{runtime_dir}/llm/5012.sock.asr.output_url")
        assert client.sql_select("llm.0.out_port") == first.output_url
        client.release_unit("llm.0")
        assert client.sql_select("llm.0.out_port") == ""
    assert ("register_unit", b"llm") in cpp_manager.calls
    assert ("release_unit", b"llm.0") in cpp_manager.calls


def test_sql_set_select_unset(cpp_manager, runtime_dir):
    with SysClient(runtime_dir=runtime_dir) as client:
        assert client.sql_set("k", "v ü") is True
        assert client.sql_select("k") == "v ü"
        # The C++ manager scans the JSON text: escapes come back as they were sent.
        assert client.sql_set("q", 'say "hi"') is True
        assert client.sql_select("q") == 'say \\"hi\\"'
        assert client.sql_set("", "v") is False
        client.sql_unset("k")
        assert client.sql_select("k") == ""
    assert ("sql_set", b'{"key":"k","val":"v \xc3\xbc"}') in cpp_manager.calls


def test_absent_manager_raises_after_the_deadline(runtime_dir):
    with SysClient(runtime_dir=runtime_dir, retry_deadline=0.3) as client:
        with pytest.raises(SysUnavailable, match="register_unit"):
            client.register_unit("llm")


class _Retrying(logging.Handler):
    """Sets ``seen`` once the sys client reports a failed attempt it will retry."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.seen.set()


def test_a_manager_that_starts_late_is_waited_for(runtime_dir):
    started = threading.Event()
    manager = CppStyleManager(runtime_dir)
    retrying = _Retrying()
    logger = logging.getLogger("edgellm.comm.sys_client")
    logger.addHandler(retrying)
    level = logger.level
    logger.setLevel(logging.DEBUG)

    def start_once_retrying() -> None:
        if retrying.seen.wait(10):  # the client has already failed once: now it must wait
            manager.start()
            started.set()

    starter = threading.Thread(target=start_once_retrying)
    starter.start()
    try:
        with SysClient(runtime_dir=runtime_dir, retry_deadline=10) as client:
            registration = client.register_unit("llm")
        assert started.is_set()
        assert registration.work_id == "llm.0"
    finally:
        starter.join(10)
        logger.removeHandler(retrying)
        logger.setLevel(level)
        manager.stop()


def test_silent_service_times_out_then_recovers(runtime_dir):
    ctx = zmq.Context.instance()
    mute = ctx.socket(zmq.ROUTER)  # bound but never answers
    mute.linger = 0
    mute.bind(f"ipc://{runtime_dir}/rpc.sys")
    try:
        with SysClient(runtime_dir=runtime_dir, call_timeout=0.2, retry_deadline=0.5) as client:
            with pytest.raises(SysUnavailable):
                client.sql_select("k")
    finally:
        mute.close()
    with CppStyleManager(runtime_dir) as manager:
        manager.kv["k"] = "v"
        with SysClient(runtime_dir=runtime_dir) as client:
            assert client.sql_select("k") == "v"


def test_malformed_register_reply_is_a_sys_error(runtime_dir):
    ctx = zmq.Context.instance()
    rep = ctx.socket(zmq.REP)
    rep.linger = 0
    rep.bind(f"ipc://{runtime_dir}/rpc.sys")

    def answer() -> None:
        if rep.poll(5000):
            rep.recv_multipart()
            rep.send(b"\x05ab")  # length byte past the end

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with SysClient(runtime_dir=runtime_dir) as client:
            with pytest.raises(SysError, match="malformed"):
                client.register_unit("llm")
    finally:
        thread.join()
        rep.close()
