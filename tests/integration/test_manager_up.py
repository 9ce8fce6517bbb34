"""``edgellm up`` (what ``make run`` runs): manager + llm unit + echo unit + the OpenAI gateway
as children, a StackFlow address and an OpenAI one, all stopped on SIGTERM with nothing left
behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile

import openai
import pytest

from manager_support import LISTENING, Client, _read_line_until, inference_request, setup_request, socket_files


def test_up_serves_the_model_and_the_echo_unit_and_stops_them_all(tiny_model_dir):
    pytest.importorskip("torch")
    with tempfile.TemporaryDirectory(prefix="el-up-", dir="/tmp") as runtime_dir:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING", "up",
             "--port", "0", "--runtime-dir", runtime_dir, "--model", f"tiny={tiny_model_dir}",
             "--threads", "1", "--http-port", "0"],
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        try:
            port = int(LISTENING.search(_read_line_until(proc, LISTENING.pattern, 30)).group(2))
            gateway = _read_line_until(proc, r"gateway .* listening on http://", 120)
            base_url = gateway.split()[-1].strip()
            _read_line_until(proc, "connect", 30)
            with Client(port) as client:
                work_id = client.request(setup_request("echo"))["work_id"]
                pieces = client.stream(inference_request(work_id, "up", unit="echo"))
                assert [p["data"]["delta"] for p in pieces] == ["up", "hello", ""]
                answer = client.request(setup_request(model="tiny", max_token_len=8))
                assert answer["error"]["code"] == 0 and answer["work_id"].startswith("llm.")
                pieces = client.stream(inference_request(answer["work_id"], "hi"))
                assert pieces[-1]["data"]["finish"] is True and pieces[-1]["error"]["code"] == 0
                assert pieces[-1]["data"]["completion_tokens"] <= 8
            with openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0) as oai:
                answer = oai.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
                assert answer.usage.completion_tokens <= 4 and answer.choices[0].finish_reason
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        assert socket_files(runtime_dir) == []
