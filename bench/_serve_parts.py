"""bench/serve.py's parts: the boxes and gateway as processes, the chat workload, the
gateway's own latency (not a benchmark on its own)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

BLOCK = 16
WORDS = ("river stone lantern orbit cedar quartz harbor meadow signal copper falcon ember "
         "glacier thunder velvet canyon prism willow beacon saffron timber lattice nova "
         "summit marble cobalt tundra maple vector ripple").split()  # fmt: skip
LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")
GATEWAY = re.compile(r"listening on (http://[\d.]+:\d+)")


# -- processes ---------------------------------------------------------------------------------

def start(cmd: list[str], marker: str, log: str, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """A child (stderr to ``log``, so nothing follows our last line), once it prints
    ``marker``."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if marker in line:
            return proc, line
    proc.kill()
    with open(log, errors="replace") as fh:
        sys.stderr.write(fh.read()[-3000:])
    raise RuntimeError(f"{' '.join(cmd[3:6])} did not print {marker!r}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


class Cluster:
    """Three boxes and a gateway routing with ``policy``."""

    def __init__(self, work: str, policy: str, kv_mb: float, boxes: int = 3):
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        base = [sys.executable, "-m", "edgellm.cli", "--log-level", "WARNING"]
        log = os.path.join(work, f"{policy}.log")
        try:
            for i in range(boxes):
                runtime = os.path.join(work, f"{policy}-box{i}")
                os.makedirs(runtime)
                lo = 20000 + 1000 * i
                manager, line = start([*base, "unit-manager", "--port", "0", "--runtime-dir",
                                       runtime, "--box-name", f"box{i}", "--min-port", str(lo),
                                       "--max-port", str(lo + 500)], "listening on", log)  # fmt: skip
                self.procs.append(manager)
                self.ports.append(int(LISTENING.search(line).group(2)))
                unit, _ = start([*base, "unit", "llm", "--runtime-dir", runtime, "--threads", "1",
                                 "--kv-cache-mb", f"{kv_mb:.3f}"], "ready", log)  # fmt: skip
                self.procs.append(unit)
            boxes_args = [a for p in self.ports for a in ("--box", f"127.0.0.1:{p}")]
            gateway, line = start([*base, "serve", "--port", "0", *boxes_args,
                                   "--routing-strategy", policy, "--refresh-interval", "0.5"],
                                  "listening on", log)  # fmt: skip
            self.procs.append(gateway)
            self.url = GATEWAY.search(line).group(1)
            self._wait_ready(boxes)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, boxes: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                health = httpx.get(self.url + "/health", timeout=5).json()
                if sum(b["ready"] for b in health.get("backends", {}).values()) == boxes:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError("the gateway did not see every box ready")

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


# -- workload ----------------------------------------------------------------------------------

def system_prompts(tokenizer, count: int, tokens: int, rng: random.Random) -> list[str]:
    out = []
    for i in range(count):
        words = [f"Assistant profile {i}."]
        while len(tokenizer.encode(" ".join(words))) < tokens:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words))
    return out


def conversations(systems: list[str], count: int, turns: int, rng: random.Random) -> list[list[str]]:
    """Per conversation, its users' messages (the system prompt is ``systems[i % len]``)."""
    return [[f"Question {c}.{t}: " + " ".join(rng.choice(WORDS) for _ in range(12))
             for t in range(turns)] for c in range(count)]  # fmt: skip


def working_set_blocks(tokenizer, systems, users, max_tokens: int) -> tuple[int, int]:
    """Distinct KV blocks of every conversation's longest prompt (shared system prompts once),
    and the blocks of the longest request (its prompt and answer)."""
    blocks = set()
    longest = 0
    for c, turns in enumerate(users):
        messages = [{"role": "system", "content": systems[c % len(systems)]}]
        for t, text in enumerate(turns):
            messages.append({"role": "user", "content": text})
            if t < len(turns) - 1:
                messages.append({"role": "assistant", "content": "x " * max_tokens})
        ids = tokenizer.encode_chat(messages)
        longest = max(longest, -(-(len(ids) + max_tokens) // BLOCK))
        prefix = ()
        for b in range(len(ids) // BLOCK):
            prefix = (prefix, tuple(ids[b * BLOCK:(b + 1) * BLOCK]))
            blocks.add(hash(prefix))
    return len(blocks), longest


def block_bytes() -> int:
    """K and V of one block over every layer, float32, for the default model."""
    from gguf import GGUFReader

    from edgellm.models import default_model

    reader = GGUFReader(default_model().path)

    def field(name):
        f = reader.fields[name]
        return int(f.parts[f.data[0]][0])

    arch = "llama"
    layers = field(f"{arch}.block_count")
    heads, kv_heads = field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")
    head_dim = field(f"{arch}.embedding_length") // heads
    return 2 * layers * kv_heads * head_dim * 4 * BLOCK


async def run_policy(url: str, model: str, systems, users, args, rng: random.Random) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    histories = [[{"role": "system", "content": systems[c % len(systems)]}] for c in range(len(users))]
    next_turn = [0] * len(users)
    busy: set[int] = set()
    lock = asyncio.Lock()

    async def take() -> int | None:
        async with lock:
            free = [c for c in range(len(users)) if next_turn[c] < args.turns and c not in busy]
            if not free:
                return None if all(t >= args.turns for t in next_turn) else -1
            c = rng.choice(free)
            busy.add(c)
            return c

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            c = await take()
            if c is None:
                return
            if c == -1:
                await asyncio.sleep(0.01)
                continue
            messages = histories[c] + [{"role": "user", "content": users[c][next_turn[c]]}]
            body = {"model": model, "messages": messages, "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            started = time.perf_counter()
            first = None
            text, usage, pod = [], None, None
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    pod = resp.headers.get("target-pod")
                    if resp.status_code != 200:
                        raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(chunk["error"]["message"])
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        for choice in chunk.get("choices", ()):
                            piece = choice["delta"].get("content")
                            if piece:
                                first = first or time.perf_counter()
                                text.append(piece)
            except (httpx.HTTPError, RuntimeError) as exc:
                errors.append(repr(exc)[:200])
            else:
                results.append({"ttft": (first or time.perf_counter()) - started, "pod": pod,
                                "prompt": usage["prompt_tokens"],
                                "cached": usage["prompt_tokens_details"]["cached_tokens"]})
            async with lock:
                histories[c] = messages + [{"role": "assistant", "content": "".join(text)}]
                next_turn[c] += 1
                busy.discard(c)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    wall = time.perf_counter() - started
    ttfts = sorted(r["ttft"] * 1000 for r in results)
    spread: dict[str, int] = {}
    for r in results:
        spread[r["pod"]] = spread.get(r["pod"], 0) + 1
    return {
        "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
        "ttft_p50_ms": round(_pct(ttfts, 0.5), 1), "ttft_p99_ms": round(_pct(ttfts, 0.99), 1),
        "cached_share": round(sum(r["cached"] for r in results)
                              / max(1, sum(r["prompt"] for r in results)), 3),
        "requests_per_s": round(len(results) / wall, 2), "wall_s": round(wall, 1),
        "per_box": dict(sorted(spread.items())),
    }  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


# -- the gateway's own latency -----------------------------------------------------------------

def overhead(cluster: Cluster, model: str, samples: int) -> dict:
    """First token of the same warm prompt, straight from a unit and through the gateway."""
    messages = [{"role": "system", "content": "You are brief."},
                {"role": "user", "content": "Name a colour."}]  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", cluster.ports[0]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")

    def send(obj) -> None:
        sock.sendall((json.dumps(obj) + "\n").encode())

    send({"request_id": "setup", "work_id": "llm", "action": "setup", "object": "llm.setup",
          "data": {"model": model, "response_format": "llm.utf-8.stream", "input": "llm.utf-8",
                   "enoutput": True}})  # fmt: skip
    work_id = json.loads(reader.readline())["work_id"]
    client = httpx.Client(base_url=cluster.url, timeout=60)
    body = {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    headers = {"routing-strategy": "prefix-cache"}

    def direct() -> float:
        started = time.perf_counter()
        send({"request_id": "d", "work_id": work_id, "action": "inference", "object": "llm.utf-8",
              "data": {"messages": messages, "max_tokens": 2, "temperature": 0, "ignore_eos": True}})
        first = None
        while True:
            answer = json.loads(reader.readline())
            data = answer["data"]
            if first is None and data.get("delta"):
                first = time.perf_counter() - started
            if data.get("finish"):
                return first if first is not None else time.perf_counter() - started

    def through() -> float:
        started = time.perf_counter()
        first = None
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            for line in resp.iter_lines():
                if first is None and '"content":"' in line and '"content":""' not in line:
                    first = time.perf_counter() - started
        return first

    for _ in range(5):  # warm: the prompt cached on every box, tasks set up, connections open
        direct()
        through()
    pairs = [(direct(), through()) for _ in range(samples)]
    send({"request_id": "exit", "work_id": work_id, "action": "exit"})
    sock.close()
    client.close()
    d = sorted(p[0] * 1000 for p in pairs)
    g = sorted(p[1] * 1000 for p in pairs)
    return {"samples": samples, "direct_p50_ms": round(_pct(d, 0.5), 2),
            "gateway_p50_ms": round(_pct(g, 0.5), 2),
            "added_p50_ms": round(_pct(g, 0.5) - _pct(d, 0.5), 2),
            "direct_p99_ms": round(_pct(d, 0.99), 2), "gateway_p99_ms": round(_pct(g, 0.99), 2)}
