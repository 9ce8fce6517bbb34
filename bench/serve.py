"""Serving benchmark: cache-aware routing of real requests through ``edgellm serve``, against
round-robin (the baseline), in one run.

Three boxes on this machine (three unit managers, each with an ``edgellm unit llm`` on the
real default model, one PyTorch thread each, a KV budget holding about a third of the
working set) behind one gateway. The workload is a seeded multi-turn chat: ``--prompts``
distinct system prompts of ~``--system-tokens`` tokens, ``--conversations`` conversations x
``--turns`` turns (each turn's prompt is the whole conversation so far), ``--concurrency``
requests in flight, every answer exactly ``--max-tokens`` tokens (greedy, ``ignore_eos``: the
same work for every policy). Conversations interleave: a free worker takes a random
conversation that has turns left and is not running, so a conversation's history must
survive other requests in the caches.

Per policy (fresh boxes each time, so every policy starts cold): time to first token
p50/p99, the cached-token share (``usage.prompt_tokens_details.cached_tokens`` over prompt
tokens), requests/s, errors, requests per box. Then the gateway's own latency on an idle
system: the same warm prompt, first token straight from a unit (a StackFlow session on its
front door) and through the gateway, alternating.

The last line printed is one JSON object, with the ratios and the goals of issue 10:
prefix-cache TTFT p50 <= 0.5x round-robin's, cached share >= 2x round-robin's, the gateway's
added latency <= 5 ms p50.

    python bench/serve.py [--policies prefix-cache,round-robin] [--conversations 24] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="prefix-cache,round-robin")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=400)
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-fraction", type=float, default=1 / 3,
                        help="each box's KV budget as a share of the working set")
    parser.add_argument("--overhead-samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from edgellm.models import DEFAULT_MODEL_NAME, default_model, load_tokenizer

    tokenizer = load_tokenizer(default_model())
    rng = random.Random(args.seed)
    systems = system_prompts(tokenizer, args.prompts, args.system_tokens, rng)
    users = conversations(systems, args.conversations, args.turns, rng)
    blocks, longest = working_set_blocks(tokenizer, systems, users, args.max_tokens)
    # a box must at least hold the requests it may run at once, whatever the fraction
    budget = max(blocks * args.kv_fraction, longest * args.concurrency + 4)
    kv_mb = budget * block_bytes() / (1 << 20)
    print(f"working set {blocks} blocks (longest request {longest}); KV budget per box "
          f"{budget:.0f} blocks = {kv_mb:.1f} MiB ({budget / blocks:.2f} of it)", flush=True)
    work = tempfile.mkdtemp(prefix="bench-serve-")
    out: dict = {"model": DEFAULT_MODEL_NAME, "working_set_blocks": blocks,
                 "kv_blocks_per_box": round(budget),
                 "kv_mb_per_box": round(kv_mb, 1), "workload": {k: getattr(args, k) for k in (
                     "prompts", "system_tokens", "conversations", "turns", "concurrency",
                     "max_tokens")}, "policies": {}}  # fmt: skip
    try:
        for i, policy in enumerate(args.policies.split(",")):
            cluster = Cluster(work, policy, kv_mb)
            try:
                result = asyncio.run(run_policy(cluster.url, DEFAULT_MODEL_NAME, systems, users,
                                                args, random.Random(args.seed + 1)))  # fmt: skip
                out["policies"][policy] = result
                print(f"{policy}: {json.dumps(result)}", flush=True)
                if i == 0:
                    out["gateway_overhead"] = overhead(cluster, DEFAULT_MODEL_NAME,
                                                       args.overhead_samples)  # fmt: skip
                    print(f"overhead: {json.dumps(out['gateway_overhead'])}", flush=True)
            finally:
                cluster.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pc, rr = out["policies"].get("prefix-cache"), out["policies"].get("round-robin")
    if pc and rr:
        out["ratios"] = {
            "ttft_p50_prefix_over_round_robin": round(pc["ttft_p50_ms"] / rr["ttft_p50_ms"], 3),
            "cached_share_prefix_over_round_robin": round(
                pc["cached_share"] / rr["cached_share"], 2) if rr["cached_share"] else None,
        }  # fmt: skip
        out["goals"] = {
            "ttft_p50_le_half": out["ratios"]["ttft_p50_prefix_over_round_robin"] <= 0.5,
            "cached_share_ge_2x": rr["cached_share"] == 0 or pc["cached_share"] >= 2 * rr["cached_share"],
            "gateway_added_le_5ms": out.get("gateway_overhead", {}).get("added_p50_ms", 99) <= 5.0,
        }  # fmt: skip
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
