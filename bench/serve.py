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
import random
import shutil
import sys
import tempfile

from _serve_parts import (Cluster, block_bytes, conversations, overhead, run_policy,
                          system_prompts, working_set_blocks)  # fmt: skip


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
