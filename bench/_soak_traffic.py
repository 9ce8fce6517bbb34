"""The soak's clients (``bench/soak.py``): each a loop on a thread of its own until a deadline.

- :func:`llm_sessions`: StackFlow sessions on the llm unit through the TCP front door: a
  setup, a streamed inference or two, exit; every third session leaves in the middle of its
  stream (closes the connection after the first piece, no exit);
- :func:`echo_sessions`: the same with the echo unit (setup, inference, exit);
- :func:`openai_chats`: the gateway with the official client, streaming or not; every third
  stream is closed after its first chunk;
- :func:`bad_input`: malformed lines and unknown actions on the front door, bad bodies at the
  gateway: each must be answered as an error (-2 / 4xx), counted apart from errors.

A :class:`Tally` counts, per kind, requests, bad inputs answered as errors, disconnects and
errors (anything unexpected: an exception, a wrong code), keeping a few examples.
"""

from __future__ import annotations

import collections
import json
import random
import socket
import threading
import time

import httpx
import openai

PROMPTS = ("What is the capital of France?", "Name three primary colours.",
           "Write one sentence about edge computing.", "Count from one to five.",
           "Say hello in Spanish.", "What does a CPU do?")  # fmt: skip
SYSTEM = ("You are a concise assistant that answers in one short sentence, without preamble. "
          "Be precise and friendly.")  # fmt: skip


class Tally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.examples: list[str] = []

    def add(self, kind: str, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[kind][what] += n

    def error(self, kind: str, message: str) -> None:
        with self._lock:
            self.counts[kind]["errors"] += 1
            if sum(e.startswith(kind + ":") for e in self.examples) < 3:
                self.examples.append(f"{kind}: {message[:300]}")

    def summary(self) -> dict:
        with self._lock:
            kinds = {k: dict(v) for k, v in sorted(self.counts.items())}
        total = collections.Counter()
        for v in kinds.values():
            total.update(v)
        return {"kinds": kinds, "requests": total["requests"], "errors": total["errors"],
                "bad_inputs_answered": total["bad_answered"], "disconnects": total["disconnects"],
                "examples": self.examples}  # fmt: skip


class Door:
    """One TCP connection to the front door, newline-delimited JSON."""

    def __init__(self, addr: tuple[str, int], timeout: float = 120.0) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def send(self, message: dict | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.sock.sendall(data)

    def answer(self) -> dict:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("the front door closed the connection")
        return json.loads(line)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _terminal(answer: dict) -> bool:
    if answer["error"]["code"] != 0:
        return True
    data = answer.get("data")
    return not isinstance(data, dict) or "finish" not in data or bool(data["finish"])


def _session(addr, unit: str, kind: str, tally: Tally, rng: random.Random, *, leave: bool) -> None:
    door = Door(addr)
    try:
        setup = {"request_id": "s", "work_id": unit, "action": "setup", "object": f"{unit}.setup",
                 "data": {"model": None, "response_format": f"{unit}.utf-8.stream",
                          "input": f"{unit}.utf-8.stream", "enoutput": True, "max_token_len": 16}}
        setup["data"]["model"] = tally.model if unit == "llm" else "echo"
        door.send(setup)
        answer = door.answer()
        tally.add(kind, "requests")
        if answer["error"]["code"] != 0:
            raise RuntimeError(f"setup: {answer}")
        work_id = answer["work_id"]
        for i in range(rng.randint(1, 2)):
            door.send({"request_id": f"i{i}", "work_id": work_id, "action": "inference",
                       "object": f"{unit}.utf-8.stream",
                       "data": {"delta": rng.choice(PROMPTS), "index": 0, "finish": True}})
            tally.add(kind, "requests")
            while True:
                piece = door.answer()
                if piece["error"]["code"] != 0:
                    raise RuntimeError(f"inference: {piece}")
                if leave:
                    tally.add(kind, "disconnects")
                    return  # mid-stream, no exit: the fabric must clean up after us
                if _terminal(piece):
                    break
        door.send({"request_id": "e", "work_id": work_id, "action": "exit"})
        tally.add(kind, "requests")
        if door.answer()["error"]["code"] != 0:
            tally.error(kind, "exit refused")
    finally:
        door.close()


def _loop(kind: str, deadline: float, tally: Tally, seed: int, body) -> None:
    rng = random.Random(seed)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            body(rng, n)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, the loop goes on
            tally.error(kind, f"{type(exc).__name__}: {exc}")
            time.sleep(0.5)


def llm_sessions(addr, deadline: float, tally: Tally, seed: int) -> None:
    _loop("stackflow_llm", deadline, tally, seed,
          lambda rng, n: _session(addr, "llm", "stackflow_llm", tally, rng, leave=n % 3 == 0))


def echo_sessions(addr, deadline: float, tally: Tally, seed: int) -> None:
    _loop("stackflow_echo", deadline, tally, seed,
          lambda rng, n: _session(addr, "echo", "stackflow_echo", tally, rng, leave=n % 5 == 0))


def openai_chats(url: str, deadline: float, tally: Tally, seed: int, *, stream: bool) -> None:
    kind = "openai_stream" if stream else "openai"

    def one(rng: random.Random, n: int) -> None:
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": rng.choice(PROMPTS)}]  # fmt: skip
        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                           timeout=300) as client:  # fmt: skip
            tally.add(kind, "requests")
            if not stream:
                answer = client.chat.completions.create(model=tally.model, messages=messages,
                                                        max_tokens=16, temperature=0)  # fmt: skip
                if not answer.choices or answer.usage.completion_tokens < 1:
                    tally.error(kind, f"empty answer: {answer}")
                return
            chunks = client.chat.completions.create(model=tally.model, messages=messages,
                                                    max_tokens=16, stream=True)  # fmt: skip
            with chunks:
                for i, _ in enumerate(chunks):
                    if n % 3 == 0 and i == 0:
                        tally.add(kind, "disconnects")
                        return  # closing the stream closes the connection mid-answer

    _loop(kind, deadline, tally, seed, one)


_BAD_LINES = (b"{bad json\n", b"[1, 2, 3]\n", b"hello\n", b'{"request_id": 1}\n',
              b'{"request_id":"b","work_id":"sys","action":"frobnicate"}\n',
              b'{"request_id":"b","work_id":"llm.999999","action":"inference","data":"x"}\n')  # fmt: skip
_BAD_BODIES = (b"{", b'{"model": "x"}', b'{"messages": []}', b'{"model": 1, "messages": "x"}')


def bad_input(addr, url: str, deadline: float, tally: Tally, seed: int) -> None:
    def one(rng: random.Random, n: int) -> None:
        if n % 2:
            door = Door(addr, timeout=30)
            try:
                for line in rng.sample(_BAD_LINES, 3):
                    door.send(line)
                    tally.add("bad_input", "requests")
                    answer = door.answer()
                    if answer["error"]["code"] in (-2, -3, -4):
                        tally.add("bad_input", "bad_answered")
                    else:
                        tally.error("bad_input", f"{line!r} answered {answer}")
            finally:
                door.close()
        else:
            body = rng.choice(_BAD_BODIES)
            tally.add("bad_input", "requests")
            resp = httpx.post(url + "/v1/chat/completions", content=body, timeout=30,
                              headers={"Content-Type": "application/json"})  # fmt: skip
            if 400 <= resp.status_code < 500 and "error" in resp.json():
                tally.add("bad_input", "bad_answered")
            else:
                tally.error("bad_input", f"{body!r} answered {resp.status_code} {resp.text[:200]}")
        time.sleep(0.05)

    _loop("bad_input", deadline, tally, seed, one)
