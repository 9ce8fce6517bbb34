"""``edgellm up`` (what ``make run`` runs): manager + echo unit as children, one address to
connect to, both stopped on SIGTERM with nothing left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile

from manager_support import LISTENING, Client, _read_line_until, inference_request, setup_request, socket_files


def test_up_serves_the_sample_session_and_stops_both_children():
    with tempfile.TemporaryDirectory(prefix="el-up-", dir="/tmp") as runtime_dir:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING", "up",
             "--port", "0", "--runtime-dir", runtime_dir],
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        try:
            port = int(LISTENING.search(_read_line_until(proc, LISTENING.pattern, 30)).group(2))
            _read_line_until(proc, "connect", 30)
            with Client(port) as client:
                work_id = client.request(setup_request())["work_id"]
                pieces = client.stream(inference_request(work_id, "up"))
                assert [p["data"]["delta"] for p in pieces] == ["up", "hello", ""]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        assert socket_files(runtime_dir) == []
