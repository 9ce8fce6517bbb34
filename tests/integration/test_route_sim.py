"""The routing simulation (bench/route_sim.py): its engines, and the cache-aware policy fed
by the real event pipeline (real publishers, ZeroMQ over loopback, the KV event manager)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
sys.path.insert(0, os.path.abspath(BENCH))

from _sim import (  # noqa: E402
    BS,
    EngineConfig,
    Request,
    SimEngine,
    conversation_hashes,
    make_engines,
    simulate,
)
from _workload import ChatWorkload, make_conversations  # noqa: E402
from route_sim import run_cache_aware, run_direct  # noqa: E402

from edgellm.kvindex.router import RouterConfig  # noqa: E402
from edgellm.protocol.kv_events import BlockRemoved, BlockStored  # noqa: E402

WORKLOAD = ChatWorkload(conversations=40, system_prompts=3, arrival_rate=1.0, seed=5)
ENGINE = EngineConfig(capacity_blocks=3000)
ROUTER = RouterConfig()


def test_workload_is_seeded_and_chats_grow_turn_by_turn() -> None:
    a, b = make_conversations(WORKLOAD), make_conversations(WORKLOAD)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert make_conversations(ChatWorkload(seed=6))[0].tokens != make_conversations(
        ChatWorkload(seed=1))[0].tokens
    chat = a[0]
    assert all(p < r for p, r in zip(chat.prompt_ends, chat.reply_ends))
    assert all(r < p for r, p in zip(chat.reply_ends, chat.prompt_ends[1:]))
    same_system = [c for c in a if c.system_prompt == chat.system_prompt][:2]
    n = WORKLOAD.system_tokens[0]
    assert len(same_system) == 2 and same_system[0].tokens[:n] == same_system[1].tokens[:n]


def test_engine_caches_a_turn_for_the_next_and_publishes_chained_events() -> None:
    chat = make_conversations(WORKLOAD)[0]
    hashes = conversation_hashes(chat)
    engine = SimEngine("e", ENGINE, salt=0xABC)
    first = Request(0, chat, hashes, 0, 0.0)
    engine.submit(first)
    [(admitted, evictions)] = engine.admit(0.0)
    assert admitted is first and first.hit_blocks == 0 and evictions == []
    [stored] = engine.prefill_done(first)
    assert isinstance(stored, BlockStored) and stored.parent_block_hash is None
    assert stored.block_hashes == [h ^ 0xABC for h in hashes[:first.prompt_blocks]]
    decode = engine.finish(first)
    assert [e.parent_block_hash for e in decode] == [
        h ^ 0xABC for h in hashes[first.prompt_blocks - 1:first.seq_blocks - 1]]
    assert engine.running == 0 and engine.reserved == 0 and len(engine.free) == first.seq_blocks
    second = Request(0, chat, hashes, 1, 10.0)
    engine.submit(second)
    engine.admit(10.0)
    assert second.hit_blocks == first.seq_blocks  # the whole first turn, reply included


def test_eviction_spares_pinned_blocks_and_takes_tails_first() -> None:
    chats = make_conversations(WORKLOAD)
    a = chats[0]
    b = next(c for c in chats if c.system_prompt != a.system_prompt)  # nothing in common
    ha, hb = conversation_hashes(a), conversation_hashes(b)
    first = Request(0, a, ha, 0, 0.0)
    second = Request(chats.index(b), b, hb, 0, 0.0)
    engine = SimEngine("e", EngineConfig(capacity_blocks=first.seq_blocks + second.seq_blocks - 3),
                       salt=0)
    engine.submit(first)
    engine.admit(0.0)
    engine.prefill_done(first)
    engine.submit(second)
    assert engine.admit(0.0) == []  # first's blocks are pinned: second waits
    engine.finish(first)
    [(_, events)] = engine.admit(1.0)
    [removed] = events
    assert isinstance(removed, BlockRemoved)
    assert removed.block_hashes == ha[first.seq_blocks - 3:first.seq_blocks][::-1]


def test_every_request_is_served_and_engines_end_idle() -> None:
    chats = make_conversations(WORKLOAD)
    engines = make_engines(3, ENGINE, 1)
    order = sorted(engines)
    result = simulate(chats, engines, lambda request, loads: order[request.chat % 3])
    assert sum(result.requests_per_engine.values()) == sum(c.turns for c in chats)
    assert result.prompt_tokens == sum(sum(c.prompt_ends) for c in chats)
    for engine in engines.values():
        assert engine.running == 0 and engine.reserved == 0 and not engine.waiting
        assert len(engine.free) == len(engine.blocks) <= ENGINE.capacity_blocks
    assert result.cached_tokens % BS == 0 and 0 < result.cached_tokens < result.prompt_tokens


def test_without_event_lag_the_pipeline_gives_the_oracles_decisions() -> None:
    aware = run_cache_aware(WORKLOAD, 4, ENGINE, ROUTER, lag_s=0.0)
    oracle = run_direct("oracle", WORKLOAD, 4, ENGINE, ROUTER)
    rr = run_direct("round-robin", WORKLOAD, 4, ENGINE, ROUTER)
    # The index the pipeline built holds exactly what the engines' caches hold ...
    assert aware["index_blocks_at_end"] == aware["engine_blocks_at_end"] > 0
    assert aware["unknown_parent"] == 0 and aware["index_evicted_blocks"] == 0
    assert aware["published"]["events"] > aware["published"]["batches"] > 0
    # ... so every decision is the one the router makes on the caches themselves.
    for key in ("hit_rate", "requests_per_engine", "reasons"):
        assert aware[key] == oracle[key]
    assert aware["hit_rate"] > 1.5 * rr["hit_rate"]


def test_the_router_sees_only_what_the_pipeline_delivered() -> None:
    oracle = run_direct("oracle", WORKLOAD, 4, ENGINE, ROUTER)
    dropped = run_cache_aware(WORKLOAD, 4, ENGINE, ROUTER, lag_s=0.0, drop_events=True)
    never = run_cache_aware(WORKLOAD, 4, ENGINE, ROUTER, lag_s=1e9)  # after the last request
    assert dropped["reasons"] == {"least-loaded": sum(dropped["requests_per_engine"])}
    assert dropped["hit_rate"] < 0.7 * oracle["hit_rate"]
    for key in ("hit_rate", "requests_per_engine", "reasons"):
        assert never[key] == dropped[key]
    assert never["index_blocks_at_end"] == never["engine_blocks_at_end"]


def test_bench_prints_one_json_object_last() -> None:
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "route_sim.py"), "--engines", "3",
         "--conversations", "12", "--capacity", "2000"],
        capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["hit_rate"]) == {"cache-aware", "oracle", "round-robin", "random"}
    assert set(out["max_over_mean_load"]) == set(out["hit_rate"])
    assert [row["lag_s"] for row in out["sweep"]] == [0.0, 0.5, 2.0, 8.0]
    assert out["sweep"][0]["vs_oracle"] == 1.0  # no lag: the oracle's own decisions
