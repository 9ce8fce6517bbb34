"""``edgellm up`` (what ``make run`` runs): manager + llm unit + echo unit as children, one
address to connect to, all stopped on SIGTERM with nothing left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile

import pytest

from manager_support import LISTENING, Client, _read_line_until, inference_request, setup_request, socket_files


def test_up_serves_the_model_and_the_echo_unit_and_stops_them_all(tiny_model_dir):
    pytest.importorskip("torch")
    with tempfile.TemporaryDirectory(prefix="el-up-", dir="/tmp") as runtime_dir:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING", "up",
             "--port", "0", "--runtime-dir", runtime_dir, "--model", f"tiny={tiny_model_dir}",
             "--threads", "1"],
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        try:
            port = int(LISTENING.search(_read_line_until(proc, LISTENING.pattern, 30)).group(2))
            _read_line_until(proc, "connect", 120)
            with Client(port) as client:
                work_id = client.request(setup_request("echo"))["work_id"]
                pieces = client.stream(inference_request(work_id, "up", unit="echo"))
                assert [p["data"]["delta"] for p in pieces] == ["up", "hello", ""]
                answer = client.request(setup_request(model="tiny", max_token_len=8))
                assert answer["error"]["code"] == 0 and answer["work_id"].startswith("llm.")
                pieces = client.stream(inference_request(answer["work_id"], "hi"))
                assert pieces[-1]["data"]["finish"] is True and pieces[-1]["error"]["code"] == 0
                assert pieces[-1]["data"]["completion_tokens"] <= 8
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        assert socket_files(runtime_dir) == []
