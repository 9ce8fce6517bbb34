"""A reference model of the prefix index and a hypothesis strategy of event sequences, shared
by the kvindex backend tests (both backends are driven against it).

The model is deliberately naive (scans everywhere) and spells out every rule of the index
contract (``edgellm.kvindex.api``) and of its eviction order (``edgellm.kvindex.memory_lru``):

- per (pod, context) a dict engine hash -> :class:`Row` (prefix hash computed with
  ``edgellm.kvindex.hashing.prefix_hashes``, parent engine hash, recency); a pod holds a
  prefix iff one of its rows has it; a row's children are the pod's rows naming it as
  parent (so a row stored again adopts them); a re-link that would make a loop is not made;
- an event that is not indexed (block size mismatch, unknown parent, no full block,
  invalid tokens) changes nothing but its counter;
- the clock ticks once per accepted BlockStored and once per pod of a match's answer (in
  pod-key order), which touches that pod's last matched prefix;
- the eviction victim is the leaf (no live child row) with the smallest (effective recency,
  engine hash); a row leaving its parent gives the parent its effective recency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st
from xxhash import xxh64_intdigest

from edgellm.kvindex.api import IndexInputError
from edgellm.kvindex.config import IndexConfig, low_watermark
from edgellm.kvindex.hashing import DEFAULT_SEED, prefix_hashes
from edgellm.kvindex.validate import context_id

BS = 4
PODS = ("ns/a", "ns/b", "ns/c")
# Two contexts of block size 4 (base model and a LoRA), one of block size 8.
CONTEXTS = (("m", -1), ("m", 7), ("big", -1))
BLOCK_SIZES = {("m", -1): 4, ("m", 7): 4, ("big", -1): 8}
# Documents share prefixes: doc 1 extends doc 0's first 3 blocks, doc 2 shares 1 block.
_BASE = [300 + i for i in range(16 * BS)]
DOCS = (
    _BASE,
    _BASE[: 3 * BS] + [900 + i for i in range(13 * BS)],
    _BASE[:BS] + [5000 + i for i in range(15 * BS)],
    [70_000 + i for i in range(16 * BS)],
)
DOC_TOKENS = len(DOCS[0])


def blocks_of(context) -> int:
    return DOC_TOKENS // BLOCK_SIZES[context]


def engine_hash(pod: str, generation: int, context, salt: int, tokens) -> int:
    """What an engine would call the block ending ``tokens``: unique per engine process;
    ``salt`` (vLLM's cache_salt, multimodal extra keys) names the same tokens otherwise."""
    return xxh64_intdigest(repr((pod, generation, context, salt, list(tokens))).encode())


@dataclass
class Row:
    engine: int
    prefix: int
    parent: int | None  # the parent block's engine hash (held or not)
    eff: int


@dataclass
class Model:
    config: IndexConfig = field(default_factory=IndexConfig)
    now: float = 0.0
    rows: dict[tuple[str, tuple], dict[int, Row]] = field(default_factory=dict)
    touch: dict[tuple[str, tuple, int], int] = field(default_factory=dict)
    block_size: dict[tuple, int] = field(default_factory=dict)
    last_access: dict[tuple, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("unknown_parent", "invalid_tokens", "block_size_mismatch", "evicted_blocks",
         "evicted_contexts"), 0))
    tick: int = 0
    next_sweep: float | None = None

    # --- the contract ------------------------------------------------------------------

    def store(self, context, pod, hashes, parent, tokens, bs) -> tuple[int, bool]:
        """``(stored, unknown_parent)`` as ``StoreResult`` says."""
        if not hashes:
            return 0, False
        self._sweep_if_due()
        if context in self.block_size and self.block_size[context] != bs:
            self.counts["block_size_mismatch"] += 1
            return 0, False
        rows = self.rows.get((pod, context), {})
        parent_row = None
        if parent is not None:
            parent_row = rows.get(parent)
            if parent_row is None:
                self.counts["unknown_parent"] += 1
                return 0, True
        n = min(len(hashes), len(tokens) // bs)
        if not n:
            return 0, False
        if not all(type(t) is int and 0 <= t < 1 << 32 for t in tokens[: n * bs]):
            self.counts["invalid_tokens"] += 1
            return 0, False
        if context not in self.block_size:
            if len(self.block_size) >= self.config.max_contexts:
                victim = min(self.block_size,
                             key=lambda c: (self.last_access[c], context_id(c)))
                self._drop_context(victim)
            self.block_size[context] = bs
        self.last_access[context] = self.now
        rows = self.rows.setdefault((pod, context), {})
        self.tick += 1
        chain = prefix_hashes(tokens[: n * bs], bs, DEFAULT_SEED,
                              None if parent_row is None else parent_row.prefix)
        prev = parent
        for e, p in zip(hashes, chain):
            row = rows.get(e)
            if row is None:
                adopted = any(r.parent == e for r in rows.values())
                link = None if adopted and self._would_loop(rows, e, prev) else prev
                rows[e] = Row(e, p, link, self.tick)
            else:
                if row.parent != prev and not self._would_loop(rows, e, prev):
                    self._detach(pod, context, row)
                    row.parent = prev
                if row.prefix != p:
                    old, row.prefix = row.prefix, p
                    self._forget_touch_if_unheld(pod, context, old)
                row.eff = self.tick
            prev = e
        self._enforce_limits(context)
        return n, False

    def remove(self, context, pod, hashes) -> int:
        self._sweep_if_due()
        removed = 0
        for (p, c) in [k for k in self.rows if k[0] == pod and context in (None, k[1])]:
            self.last_access[c] = self.now
            rows = self.rows[(p, c)]
            for e in hashes:
                if e in rows:
                    self._remove_row(p, c, rows[e])
                    removed += 1
            if not rows:
                self._drop(p, c)
        return removed

    def clear(self, pod, context=None) -> int:
        return sum(self._drop(p, c) for (p, c) in list(self.rows)
                   if p == pod and context in (None, c))

    def match(self, context, tokens, ready) -> dict[str, int]:
        if not all(type(t) is int and 0 <= t < 1 << 32 for t in tokens):
            raise IndexInputError("bad token")
        if context not in self.block_size:
            return {}
        self.last_access[context] = self.now
        chain = prefix_hashes(tokens, self.block_size[context])
        candidates = ready if ready is not None else [p for (p, c) in self.rows if c == context]
        out = {}
        for pod in candidates:
            held = {r.prefix for r in self.rows.get((pod, context), {}).values()}
            n = 0
            while n < len(chain) and chain[n] in held:
                n += 1
            if n:
                out[pod] = n
        for pod in sorted(out):
            self.tick += 1
            self.touch[(pod, context, chain[out[pod] - 1])] = self.tick
        return out

    def blocks(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def prefixes(self, context=None) -> int:
        return len({(c, r.prefix) for (p, c), rows in self.rows.items()
                    if context in (None, c) for r in rows.values()})

    def contexts(self) -> int:
        return len(self.block_size)

    # --- the rules behind it -----------------------------------------------------------

    @staticmethod
    def _would_loop(rows, engine, parent) -> bool:
        while parent is not None:
            if parent == engine:
                return True
            if parent not in rows:
                return False
            parent = rows[parent].parent
        return False

    def _effective(self, pod, context, row) -> int:
        return max(row.eff, self.touch.get((pod, context, row.prefix), 0))

    def _detach(self, pod, context, row) -> None:
        parent = self.rows[(pod, context)].get(row.parent) if row.parent is not None else None
        if parent is not None:
            parent.eff = max(parent.eff, self._effective(pod, context, row))

    def _forget_touch_if_unheld(self, pod, context, prefix) -> None:
        if not any(r.prefix == prefix for r in self.rows.get((pod, context), {}).values()):
            self.touch.pop((pod, context, prefix), None)

    def _remove_row(self, pod, context, row) -> None:
        self._detach(pod, context, row)
        del self.rows[(pod, context)][row.engine]
        self._forget_touch_if_unheld(pod, context, row.prefix)

    def _drop(self, pod, context) -> int:
        rows = self.rows.pop((pod, context), {})
        for key in [k for k in self.touch if k[:2] == (pod, context)]:
            del self.touch[key]
        return len(rows)

    def _drop_context(self, context) -> None:
        for pod, c in list(self.rows):
            if c == context:
                self._drop(pod, c)
        del self.block_size[context]
        del self.last_access[context]
        self.counts["evicted_contexts"] += 1

    def _sweep_if_due(self) -> None:
        if self.next_sweep is None or self.now < self.next_sweep:
            return
        self.next_sweep = self.now + self.config.eviction_interval_s
        for context in [c for c, t in self.last_access.items()
                        if t <= self.now - self.config.idle_eviction_s]:
            self._drop_context(context)

    def _victim(self, context=None):
        leaves = []
        for (pod, c), rows in self.rows.items():
            if context not in (None, c):
                continue
            parents = {r.parent for r in rows.values()}
            for row in rows.values():
                if row.engine not in parents:
                    leaves.append(((self._effective(pod, c, row), row.engine), pod, c, row))
        return min(leaves, key=lambda t: t[0]) if leaves else None

    def _evict(self, context=None) -> bool:
        found = self._victim(context)
        if found is None:
            return False
        _, pod, c, row = found
        self._remove_row(pod, c, row)
        self.counts["evicted_blocks"] += 1
        if not self.rows[(pod, c)]:
            self._drop(pod, c)
        return True

    def _enforce_limits(self, context) -> None:
        limit = self.config.max_prefixes_per_context
        if self.prefixes(context) > limit:
            while self.prefixes(context) > low_watermark(limit) and self._evict(context):
                pass
        if self.blocks() > self.config.max_blocks:
            while self.blocks() > low_watermark(self.config.max_blocks) and self._evict():
                pass


# --- generated operations ---------------------------------------------------------------

pods = st.sampled_from(PODS)
contexts = st.sampled_from(CONTEXTS)
docs = st.integers(0, len(DOCS) - 1)
salts = st.sampled_from((0, 0, 0, 1))  # 1: the same tokens under another engine hash

ops = st.one_of(
    # Half the stores start a chain (any other needs its parent held, or is an orphan).
    st.tuples(st.just("store"), pods, contexts, docs, st.one_of(st.just(0), st.integers(1, 15)),
              st.integers(1, 8), salts, st.sampled_from(("full", "full", "full", "short"))),
    # Continue the pod's longest held part of a document (multi-turn chats, decode steps).
    st.tuples(st.just("extend"), pods, contexts, docs, st.integers(1, 4), salts),
    st.tuples(st.just("extend"), pods, contexts, docs, st.integers(1, 4), salts),
    st.tuples(st.just("store_orphan"), pods, contexts, docs, st.integers(1, 7)),
    st.tuples(st.just("store_bad"), pods, contexts, st.sampled_from(("block_size", "tokens"))),
    st.tuples(st.just("remove"), pods, st.one_of(st.none(), contexts), docs,
              st.lists(st.integers(0, 15), min_size=1, max_size=4), salts),
    st.tuples(st.just("clear"), pods, st.one_of(st.none(), contexts)),
    st.tuples(st.just("remove_pod"), pods),
    st.tuples(st.just("restart"), pods),
    st.tuples(st.just("match"), contexts, docs, st.integers(0, DOC_TOKENS + 3),
              st.one_of(st.none(), st.lists(pods, unique=True))),
    st.tuples(st.just("wait"), st.sampled_from((1.0, 7.0, 30.0))),
)

configs = st.builds(
    lambda blocks, prefixes, n_contexts, idle: IndexConfig(
        max_blocks=blocks, max_prefixes_per_context=prefixes, max_contexts=n_contexts,
        eviction_interval_s=5.0, idle_eviction_s=idle),
    st.sampled_from((6, 12, 20, 10**6)), st.sampled_from((5, 30, 10**6)),
    st.sampled_from((1, 2, 1000, 1000)), st.sampled_from((20.0, 10**6)))


class Clock:
    """A clock the test moves (the model reads the same one)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_ops(indexes, op_list, config: IndexConfig | None = None,
            clock: Clock | None = None) -> Model:
    """Apply ``op_list`` to every index in ``indexes`` (built with ``config`` and reading
    ``clock``) and to the model, asserting the same answers and counts throughout."""
    if not isinstance(indexes, (list, tuple)):
        indexes = [indexes]
    clock = clock if clock is not None else Clock()
    model = Model(config if config is not None else indexes[0].config, now=clock.now)
    model.next_sweep = clock.now + model.config.eviction_interval_s
    generation = {p: 0 for p in PODS}

    def eh(pod, ctx, doc, i, salt=0):
        bs = BLOCK_SIZES[ctx]
        return engine_hash(pod, generation[pod], ctx, salt, DOCS[doc][: (i + 1) * bs])

    def every(call, want, op):
        for index in indexes:
            got = call(index)
            assert got == want, (op, type(index).__name__, got, want)

    for op in op_list:
        kind = op[0]
        model.now = clock.now
        if kind == "extend":  # as "store", from where the pod's held chain of ``doc`` ends
            _, pod, ctx, doc, n, salt = op
            held = {r.engine for r in model.rows.get((pod, ctx), {}).values()}
            start = 0
            while start < blocks_of(ctx) - 1 and eh(pod, ctx, doc, start, salt) in held:
                start += 1
            op = ("store", pod, ctx, doc, start, n, salt, "full")
            kind = "store"
        if kind == "store":
            _, pod, ctx, doc, start, n, salt, tokens_kind = op
            bs = BLOCK_SIZES[ctx]
            start = min(start, blocks_of(ctx) - 1)
            n = min(n, blocks_of(ctx) - start)
            hashes = [eh(pod, ctx, doc, i, salt) for i in range(start, start + n)]
            parent = eh(pod, ctx, doc, start - 1, salt) if start else None
            tokens = DOCS[doc][start * bs:(start + n) * bs]
            if tokens_kind == "short":  # a partial tail (maybe no full block at all)
                tokens = tokens[: len(tokens) - bs // 2 - bs * (n // 2)]
            want = model.store(ctx, pod, hashes, parent, tokens, bs)
            every(lambda i: _stored(i.process_block_stored(ctx, pod, hashes, parent, tokens, bs)),
                  want, op)
        elif kind == "store_orphan":
            _, pod, ctx, doc, start = op
            bs = BLOCK_SIZES[ctx]
            parent = 12345 + start  # an engine hash no pod ever stored
            hashes = [eh(pod, ctx, doc, start)]
            tokens = DOCS[doc][start * bs:(start + 1) * bs]
            want = model.store(ctx, pod, hashes, parent, tokens, bs)
            every(lambda i: _stored(i.process_block_stored(ctx, pod, hashes, parent, tokens, bs)),
                  want, op)
        elif kind == "store_bad":
            _, pod, ctx, what = op
            bs = BLOCK_SIZES[ctx]
            hashes = [eh(pod, ctx, 0, 0, 9)]
            if what == "block_size":  # the other block size: its hashes would never match
                bs = 12 - bs
                tokens = DOCS[0][:bs]
            else:
                tokens = [-1] + DOCS[0][1:bs]
            want = model.store(ctx, pod, hashes, None, tokens, bs)
            every(lambda i: _stored(i.process_block_stored(ctx, pod, hashes, None, tokens, bs)),
                  want, op)
        elif kind == "remove":
            _, pod, ctx, doc, idxs, salt = op
            hashes = [eh(pod, c, doc, min(i, blocks_of(c) - 1), s) for i in idxs
                      for c in ([ctx] if ctx else CONTEXTS) for s in {0, salt}]
            want = model.remove(ctx, pod, hashes)
            every(lambda i: i.process_block_removed(ctx, pod, hashes), want, op)
        elif kind == "clear":
            _, pod, ctx = op
            want = model.clear(pod, ctx)
            every(lambda i: i.clear_pod(pod, ctx), want, op)
        elif kind == "remove_pod":
            want = model.clear(op[1])
            every(lambda i: i.remove_pod(op[1]), want, op)
        elif kind == "restart":  # what the pipeline does when a pod's seq goes backwards
            want = model.clear(op[1])
            every(lambda i: i.clear_pod(op[1]), want, op)
            generation[op[1]] += 1
        elif kind == "match":
            _, ctx, doc, n_tokens, ready = op
            tokens = DOCS[doc][:n_tokens] if n_tokens <= DOC_TOKENS else DOCS[doc] + [1, 2, 3]
            want = model.match(ctx, tokens, ready)
            for index in indexes:
                got = index.match_prefix(ctx, tokens, ready)
                assert {p: m.matched_blocks for p, m in got.items()} == want, (op, got, want)
                n_blocks = len(tokens) // model.block_size.get(ctx, 1)
                for m in got.values():
                    assert m.percent == 100.0 * m.matched_blocks / n_blocks
        elif kind == "wait":
            clock.now += op[1]
        want_stats = {"blocks": model.blocks(), "prefixes": model.prefixes(),
                      "contexts": model.contexts(), **model.counts}
        for index in indexes:
            stats = index.stats()
            assert {k: stats[k] for k in want_stats} == want_stats, (op, type(index).__name__)
    # Final sweep: every pod, every context, every document.
    for ctx in CONTEXTS:
        for doc in range(len(DOCS)):
            want = model.match(ctx, DOCS[doc], list(PODS))
            for index in indexes:
                got = index.match_prefix(ctx, DOCS[doc], list(PODS))
                assert {p: m.matched_blocks for p, m in got.items()} == want, (ctx, doc)
    return model


def _stored(result) -> tuple[int, bool]:
    return result.stored, result.unknown_parent
