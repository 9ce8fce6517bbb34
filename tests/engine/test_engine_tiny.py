"""The engine on the tiny model: the same arithmetic as transformers, whatever the batching,
chunking, caching or preemption; its requests always end; its events match its cache."""

from __future__ import annotations

import threading

import pytest
import torch

from edgellm.engine import EngineConfig, EngineRequestError, LLMEngine, SamplingError, SamplingParams
from edgellm.engine.block_hash import BlockHasher, none_hash
from edgellm.engine.block_pool import BlockPool
from edgellm.engine.kv_cache import KVCache
from edgellm.engine.loader import load
from edgellm.engine.model_runner import ModelRunner
from edgellm.engine.request import Request
from edgellm.protocol.kv_event_types import AllBlocksCleared, BlockRemoved, BlockStored

from conftest import greedy_reference, text_of, tokens_of

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
     {"role": "user", "content": "Numbers 0 1 2 3 4 5 6 7 8 9 and some more words about blocks"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Ünïcödé text: naïve café, 日本語のテキスト, emoji 🎉🚀" * 3}],
]


@pytest.fixture(scope="module")
def engine(tiny_model):
    events = []
    eng = LLMEngine(tiny_model, EngineConfig(kv_cache_bytes=1 << 20, prefill_chunk=32),
                    on_events=events.append).start()  # fmt: skip
    eng.events = events
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode_chat(m) for m in MESSAGES]


# -- the arithmetic -----------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "transformers-path"])
@pytest.mark.parametrize("chunk", [1000, 7])
def test_last_token_logits_agree_with_transformers(tiny_model, reference, fast, chunk):
    """Prefill (whole or in chunks of 7, several requests packed in one forward) then 5 decode
    steps: every logit within 1e-4 of transformers' full forward."""
    loaded = load(tiny_model)
    assert loaded.model is not reference
    cache = KVCache(loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, 64, 16, torch.float32)
    runner = ModelRunner(loaded, cache, fast=fast)
    assert runner.path == ("fast" if fast else "transformers")
    pool = BlockPool(64, 16)
    root = none_hash()
    reqs = []
    for i, msg in enumerate(MESSAGES[:3]):
        ids = loaded.tokenizer.encode_chat(msg)
        r = Request(f"r{i}", ids, GREEDY, lambda o: None, loaded.tokenizer.detokenizer(),
                    BlockHasher(16, root), frozenset(), 0.0)  # fmt: skip
        r.blocks = pool.allocate(-(-(len(ids) + 6) // 16))
        reqs.append(r)
    with torch.inference_mode():
        for step in range(6):  # the prefill, then five decode steps
            pending = list(reqs)
            while pending:
                todo = [(r, min(chunk, r.num_tokens - r.num_computed)) for r in pending]
                rows = [i for i, (r, n) in enumerate(todo) if r.num_computed + n == r.num_tokens]
                logits = runner.forward([r for r, _ in todo], [n for _, n in todo], rows)
                for r, n in todo:
                    r.num_computed += n
                for j, i in enumerate(rows):
                    r = todo[i][0]
                    expected = reference(torch.tensor([r.token_ids])).logits[0, -1]
                    assert torch.allclose(logits[j], expected, atol=1e-4, rtol=0), (
                        f"step {step} {r.request_id}: max diff "
                        f"{(logits[j] - expected).abs().max():.2e}")
                    r.token_ids.append(int(expected.argmax()))
                pending = [r for r in pending if r.num_computed < r.num_tokens - 1]


def test_greedy_tokens_equal_generate_cold_warm_and_batched(engine, reference, prompts):
    expected = [greedy_reference(reference, p, 64) for p in prompts]
    cold = engine.generate(prompts[:1], GREEDY)
    assert tokens_of(cold[0]) == expected[0]
    warm = engine.generate(prompts[:1], GREEDY)  # the prompt's blocks are cached now
    assert warm[0][-1].cached_tokens == (len(prompts[0]) - 1) // 16 * 16 > 0
    assert tokens_of(warm[0]) == expected[0]
    batched = engine.generate(prompts, GREEDY)  # four lengths in one batch, chunked prefill
    for i, outs in enumerate(batched):
        assert tokens_of(outs) == expected[i], f"prompt {i}"
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert outs[-1].completion_tokens == 64 and outs[-1].prompt_tokens == len(prompts[i])


def test_generated_blocks_are_cached_too(engine, prompts):
    first = engine.generate(prompts[2:3], GREEDY)[0]
    continued = prompts[2] + tokens_of(first)  # the next turn carries the answer
    again = engine.generate([continued], SamplingParams(max_tokens=1, temperature=0))[0]
    assert again[-1].cached_tokens == (len(continued) - 1) // 16 * 16
    assert again[-1].cached_tokens > len(prompts[2])


# -- text -----------------------------------------------------------------------------------


def test_stop_string_spanning_tokens_ends_the_text_before_it(engine, prompts):
    full = engine.generate(prompts[1:2], GREEDY)[0]
    text = text_of(full)
    ids = tokens_of(full)
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [engine.tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    i = next(i for i in range(3, len(ids)) if len(pieces[i + 1]) - len(pieces[i]) >= 2
             and len(pieces[i + 2]) > len(pieces[i + 1]))  # fmt: skip
    start = len(pieces[i]) + 1
    stop = text[start : len(pieces[i + 1]) + 1]
    assert len(stop) >= 2 and text.find(stop) == start
    outs = engine.generate(prompts[1:2], SamplingParams(max_tokens=64, temperature=0,
                                                        ignore_eos=True, stop=[stop]))[0]  # fmt: skip
    assert text_of(outs) == text[:start]
    assert outs[-1].finish_reason == "stop"
    for out in outs:
        assert stop not in out.text


def test_text_never_splits_a_character(engine):
    ids = engine.tokenizer.encode("日本語のテキスト 🎉🚀 naïve", add_special_tokens=False)
    detok = engine.tokenizer.detokenizer()
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == "日本語のテキスト 🎉🚀 naïve"
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens were half characters


def test_a_stop_token_ends_generation_with_it(engine, reference, prompts):
    expected = greedy_reference(reference, prompts[0], 64)
    k = next(k for k in range(3, 64) if expected[k] not in expected[:k])
    params = SamplingParams(max_tokens=64, temperature=0, stop_token_ids=(expected[k],))
    outs = engine.generate(prompts[:1], params)[0]
    assert tokens_of(outs) == expected[: k + 1] and outs[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(engine, prompts):
    params = [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=s)
              for s in (7, 7, 8)]  # fmt: skip
    a, b, c = engine.generate([prompts[1]] * 3, params)
    assert tokens_of(a) == tokens_of(b)
    assert tokens_of(a) != tokens_of(c)


def test_top_k_one_is_greedy(engine, reference, prompts):
    outs = engine.generate(prompts[:1], SamplingParams(max_tokens=16, temperature=0.8, top_k=1,
                                                       ignore_eos=True))[0]  # fmt: skip
    assert tokens_of(outs) == greedy_reference(reference, prompts[0], 16)


# -- limits -------------------------------------------------------------------------------------


def test_bad_requests_are_refused_at_once(engine, prompts):
    noop = lambda out: None  # noqa: E731
    with pytest.raises(EngineRequestError, match="empty"):
        engine.add_request("e1", [], GREEDY, noop)
    with pytest.raises(EngineRequestError, match="vocabulary"):
        engine.add_request("e2", [engine.tokenizer.vocab_size], GREEDY, noop)
    with pytest.raises(EngineRequestError, match="vocabulary"):
        engine.add_request("e3", [True, 1], GREEDY, noop)
    with pytest.raises(EngineRequestError, match="context"):
        engine.add_request("e4", [1] * engine.max_model_len, GREEDY, noop)
    with pytest.raises(SamplingError):
        SamplingParams(max_tokens=0)
    with pytest.raises(SamplingError):
        SamplingParams(top_p=0)
    done = threading.Event()
    engine.add_request("dup", prompts[0], SamplingParams(max_tokens=200, temperature=0,
                                                         ignore_eos=True),
                       lambda out: out.finished and done.set())  # fmt: skip
    with pytest.raises(EngineRequestError, match="already"):
        engine.add_request("dup", prompts[0], GREEDY, noop)
    engine.abort("dup")
    assert done.wait(10)


def test_abort_ends_a_request_and_frees_its_blocks(engine, prompts):
    outs = []
    finished = threading.Event()

    def on_output(out):
        outs.append(out)
        if len(outs) == 3:
            engine.abort("to-abort")
        if out.finished:
            finished.set()

    engine.add_request("to-abort", prompts[1], SamplingParams(max_tokens=500, temperature=0,
                                                              ignore_eos=True), on_output)  # fmt: skip
    assert finished.wait(10)
    assert outs[-1].finish_reason == "abort" and outs[-1].completion_tokens < 500
    assert sum(1 for o in outs if o.finished) == 1
    _wait_idle(engine)
    assert engine.pool.num_free == engine.pool.num_blocks


def _wait_idle(engine, timeout=10.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = engine.stats()
        if s.num_requests_running == 0 and s.num_requests_waiting == 0 \
                and engine.pool.num_free == engine.pool.num_blocks:  # fmt: skip
            return
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def test_a_small_pool_preempts_and_still_gives_the_same_tokens(tiny_model, reference, prompts):
    events = []
    # 12 blocks of 16 tokens: four requests of ~40-120 tokens growing by 48 cannot all fit.
    small = LLMEngine(tiny_model, EngineConfig(kv_cache_bytes=12 * 16 * 2 * 2 * 2 * 16 * 4,
                                               prefill_chunk=16), on_events=events.append)  # fmt: skip
    with small:
        assert small.pool.num_blocks == 12
        params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
        outs = small.generate(prompts[:3], params, timeout=60)
        assert small.stats().preemptions > 0
        for i, o in enumerate(outs):
            assert tokens_of(o) == greedy_reference(reference, prompts[i], 48), f"prompt {i}"
        _wait_idle(small)
        _check_events_replay_to_cache(events, small.pool)


def test_a_request_that_outgrows_the_pool_ends_with_length(tiny_model, prompts):
    with LLMEngine(tiny_model, EngineConfig(kv_cache_bytes=4 * 16 * 2 * 2 * 2 * 16 * 4)) as tiny:
        assert tiny.pool.num_blocks == 4
        with pytest.raises(EngineRequestError, match="blocks"):
            tiny.add_request("big", [1] * 64, GREEDY, lambda out: None)
        outs = tiny.generate([prompts[0]], SamplingParams(max_tokens=500, temperature=0,
                                                           ignore_eos=True), timeout=60)[0]  # fmt: skip
        assert outs[-1].finish_reason == "length"
        # Every token but the last sampled one has KV: 4 blocks hold them all.
        assert len(prompts[0]) + outs[-1].completion_tokens == 4 * 16 + 1


# -- events ---------------------------------------------------------------------------------


def _check_events_replay_to_cache(event_batches, pool):
    held: dict[int, int | None] = {}
    for batch in event_batches:
        for ev in batch:
            if isinstance(ev, BlockStored):
                parent = ev.parent_block_hash
                for h in ev.block_hashes:
                    assert h not in held
                    held[h] = parent
                    parent = h
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    del held[h]
            elif isinstance(ev, AllBlocksCleared):
                held.clear()
    assert set(held) == set(pool.cached_hashes(published_only=True))


def test_events_replay_to_the_cache_and_reset_clears_it(engine, prompts):
    engine.generate(prompts, GREEDY)
    _wait_idle(engine)
    _check_events_replay_to_cache(engine.events, engine.pool)
    stored = [ev for batch in engine.events for ev in batch if isinstance(ev, BlockStored)]
    assert stored and all(ev.block_size == 16 and ev.medium == "CPU" for ev in stored)
    assert engine.reset_prefix_cache().result(10) is True
    assert isinstance(engine.events[-1][-1], AllBlocksCleared)
    assert engine.pool.num_cached == 0
    again = engine.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0))[0]
    assert again[-1].cached_tokens == 0


def test_stop_aborts_what_is_in_flight(tiny_model, prompts):
    eng = LLMEngine(tiny_model, EngineConfig(kv_cache_bytes=1 << 20)).start()
    outs = []
    got = threading.Event()
    eng.add_request("long", prompts[1], SamplingParams(max_tokens=900, temperature=0,
                                                       ignore_eos=True),
                    lambda out: (outs.append(out), got.set()))  # fmt: skip
    assert got.wait(10)
    eng.stop()
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    with pytest.raises(EngineRequestError, match="not running"):
        eng.add_request("late", prompts[0], GREEDY, lambda out: None)
    eng.stop()  # idempotent


def test_salted_blocks_are_reused_by_their_tenant_and_never_published(tiny_model, prompts):
    events = []
    with LLMEngine(tiny_model, EngineConfig(kv_cache_bytes=1 << 20), on_events=events.append) as eng:
        params = SamplingParams(max_tokens=4, temperature=0)
        done = threading.Semaphore(0)

        def run(rid, salt):
            outs = []
            eng.add_request(rid, prompts[1], params, lambda o: (outs.append(o), o.finished and done.release()),
                            cache_salt=salt)  # fmt: skip
            assert done.acquire(timeout=30)
            return outs[-1]

        first = run("a1", "tenant-a")
        assert first.cached_tokens == 0
        assert run("a2", "tenant-a").cached_tokens > 0  # the tenant reuses its own prefix
        assert run("b1", "tenant-b").cached_tokens == 0  # another tenant does not
        assert run("open", None).cached_tokens == 0  # nor does an unsalted request
        _wait_idle(eng)
        stored = {h for batch in events for ev in batch if isinstance(ev, BlockStored)
                  for h in ev.block_hashes}  # fmt: skip
        private = set(eng.pool.cached_hashes()) - set(eng.pool.cached_hashes(published_only=True))
        assert private and not (private & stored)
        _check_events_replay_to_cache(events, eng.pool)
