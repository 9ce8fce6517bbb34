"""A reference model of "which pod holds which block" and a hypothesis strategy of event
sequences, shared by the kvindex backend tests.

The model is deliberately naive: per (pod, context) a dict engine hash -> prefix hash, the
prefix hashes computed with ``edgellm.kvindex.hashing.prefix_hashes`` one event at a time;
a pod holds a prefix iff one of its engine hashes maps to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st
from xxhash import xxh64_intdigest

from edgellm.kvindex.hashing import DEFAULT_SEED, prefix_hashes

BS = 4
PODS = ("ns/a", "ns/b", "ns/c")
CONTEXTS = (("m", -1), ("m", 7))
# Documents share prefixes: doc 1 extends doc 0's first 3 blocks, doc 2 shares 1 block.
_BASE = [300 + i for i in range(8 * BS)]
DOCS = (
    _BASE,
    _BASE[: 3 * BS] + [900 + i for i in range(5 * BS)],
    _BASE[:BS] + [5000 + i for i in range(7 * BS)],
    [70_000 + i for i in range(8 * BS)],
)


def engine_hash(pod: str, generation: int, context, tokens) -> int:
    """What an engine would call the block ending ``tokens``: unique per engine process."""
    return xxh64_intdigest(repr((pod, generation, context, list(tokens))).encode())


@dataclass
class Model:
    held: dict[tuple[str, tuple], dict[int, int]] = field(default_factory=dict)

    def store(self, context, pod, hashes, parent, tokens, bs) -> bool:
        """False when the parent is unknown (nothing indexed)."""
        pmap = self.held.setdefault((pod, context), {})
        if parent is not None and parent not in pmap:
            if not pmap:
                del self.held[(pod, context)]
            return False
        start = None if parent is None else pmap[parent]
        n = min(len(hashes), len(tokens) // bs)
        for e, p in zip(hashes, prefix_hashes(tokens[: n * bs], bs, DEFAULT_SEED, start)):
            pmap.pop(e, None)
            pmap[e] = p
        return True

    def remove(self, context, pod, hashes) -> int:
        removed = 0
        for (p, c), pmap in self.held.items():
            if p == pod and (context is None or c == context):
                for e in hashes:
                    if pmap.pop(e, None) is not None:
                        removed += 1
        return removed

    def clear(self, pod, context=None) -> int:
        keys = [k for k in self.held if k[0] == pod and (context is None or k[1] == context)]
        return sum(len(self.held.pop(k)) for k in keys)

    def match(self, context, tokens, ready) -> dict[str, int]:
        chain = prefix_hashes(tokens, BS)
        out = {}
        for pod in ready:
            values = set(self.held.get((pod, context), {}).values())
            n = 0
            while n < len(chain) and chain[n] in values:
                n += 1
            if n:
                out[pod] = n
        return out

    def blocks(self) -> int:
        return sum(len(m) for m in self.held.values())


pods = st.sampled_from(PODS)
contexts = st.sampled_from(CONTEXTS)
docs = st.integers(0, len(DOCS) - 1)

ops = st.one_of(
    # Half the stores start a chain (any other needs its parent held, or is an orphan).
    st.tuples(st.just("store"), pods, contexts, docs, st.one_of(st.just(0), st.integers(1, 7)),
              st.integers(1, 8)),
    st.tuples(st.just("store_orphan"), pods, contexts, docs, st.integers(1, 7)),
    st.tuples(st.just("remove"), pods, st.one_of(st.none(), contexts), docs,
              st.lists(st.integers(0, 7), min_size=1, max_size=4)),
    st.tuples(st.just("clear"), pods, st.one_of(st.none(), contexts)),
    st.tuples(st.just("remove_pod"), pods),
    st.tuples(st.just("restart"), pods),
    st.tuples(st.just("match"), contexts, docs, st.integers(0, 8 * BS + 3),
              st.lists(pods, unique=True)),
)


def run_ops(index, op_list) -> Model:
    """Apply ``op_list`` to ``index`` and the model, asserting equal answers throughout."""
    model = Model()
    generation = {p: 0 for p in PODS}

    def eh(pod, context, doc, i):
        return engine_hash(pod, generation[pod], context, DOCS[doc][: (i + 1) * BS])

    for op in op_list:
        kind = op[0]
        if kind == "store":
            _, pod, ctx, doc, start, n = op
            n = min(n, 8 - start)
            hashes = [eh(pod, ctx, doc, i) for i in range(start, start + n)]
            parent = eh(pod, ctx, doc, start - 1) if start else None
            tokens = DOCS[doc][start * BS:(start + n) * BS]
            known = model.store(ctx, pod, hashes, parent, tokens, BS)
            result = index.process_block_stored(ctx, pod, hashes, parent, tokens, BS)
            assert result.unknown_parent == (not known), (op, result)
            assert result.stored == (n if known else 0), (op, result)
        elif kind == "store_orphan":
            _, pod, ctx, doc, start = op
            parent = 12345 + start  # an engine hash no pod ever stored
            hashes = [eh(pod, ctx, doc, start)]
            tokens = DOCS[doc][start * BS:(start + 1) * BS]
            assert not model.store(ctx, pod, hashes, parent, tokens, BS)
            result = index.process_block_stored(ctx, pod, hashes, parent, tokens, BS)
            assert result.unknown_parent and result.stored == 0, result
        elif kind == "remove":
            _, pod, ctx, doc, idxs = op
            hashes = [eh(pod, c, doc, i) for i in idxs for c in ([ctx] if ctx else CONTEXTS)]
            assert index.process_block_removed(ctx, pod, hashes) == model.remove(ctx, pod, hashes), op
        elif kind == "clear":
            _, pod, ctx = op
            assert index.clear_pod(pod, ctx) == model.clear(pod, ctx), op
        elif kind == "remove_pod":
            assert index.remove_pod(op[1]) == model.clear(op[1]), op
        elif kind == "restart":  # what the pipeline does when a pod's seq goes backwards
            assert index.clear_pod(op[1]) == model.clear(op[1]), op
            generation[op[1]] += 1
        elif kind == "match":
            _, ctx, doc, n_tokens, ready = op
            tokens = DOCS[doc][:n_tokens] if n_tokens <= len(DOCS[doc]) else DOCS[doc] + [1, 2, 3]
            got = index.match_prefix(ctx, tokens, ready)
            want = model.match(ctx, tokens, ready)
            assert {p: m.matched_blocks for p, m in got.items()} == want, (op, got, want)
            n_blocks = len(tokens) // BS
            for p, m in got.items():
                assert m.percent == 100.0 * m.matched_blocks / n_blocks
        assert index.stats()["blocks"] == model.blocks(), op
    # Final sweep: every pod, every context, every document.
    for ctx in CONTEXTS:
        for doc in range(len(DOCS)):
            got = index.match_prefix(ctx, DOCS[doc], list(PODS))
            want = model.match(ctx, DOCS[doc], PODS)
            assert {p: m.matched_blocks for p, m in got.items()} == want, (ctx, doc)
    return model
