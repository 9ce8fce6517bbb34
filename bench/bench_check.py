"""Invariants of an index at its budget, checked by ``ingest.py`` on memory and Redis alike.

- *no over-claim*: for a sample of stored blocks, the prompt of the block's whole chain is
  matched; every block a pod is said to hold must be one that pod stored;
- *leaves before parents*: every row a pod holds has its parent held too (the stream never
  removes blocks itself, so only eviction could break a chain, and it must take leaves).
"""

from __future__ import annotations

import random

from edgellm.kvindex.hashing import DEFAULT_SEED, prefix_hashes
from edgellm.protocol.kv_events import decode_batch

CONTEXT = ("bench-model", -1)


def held_prefixes_ok(index, payloads, samples: int = 300, seed: int = 1) -> bool:
    tokens: dict[tuple[str, int], tuple[int | None, list[int]]] = {}
    prefix: dict[tuple[str, int], int] = {}
    stored: dict[str, set[int]] = {}
    for pod, payload in payloads:
        for ev in decode_batch(payload).events:
            parent = ev.parent_block_hash
            h = DEFAULT_SEED if parent is None else prefix[(pod, parent)]
            bs = ev.block_size
            for i, e in enumerate(ev.block_hashes):
                block = ev.token_ids[i * bs:(i + 1) * bs]
                (h,) = prefix_hashes(block, bs, DEFAULT_SEED, h)
                prefix[(pod, e)] = h
                tokens[(pod, e)] = (parent, block)
                stored.setdefault(pod, set()).add(h)
                parent = e
    rng = random.Random(seed)
    for pod, e in rng.sample(sorted(tokens), min(samples, len(tokens))):
        chain = []
        at: int | None = e
        while at is not None:
            parent, block = tokens[(pod, at)]
            chain.append(block)
            at = parent
        prompt = [t for block in reversed(chain) for t in block]
        hashes = prefix_hashes(prompt, 16, DEFAULT_SEED)
        for holder, match in index.match_prefix(CONTEXT, prompt).items():
            if not set(hashes[: match.matched_blocks]) <= stored[holder]:
                return False
    return _parents_held(index)


def _parents_held(index) -> bool:
    if hasattr(index, "_contexts"):  # memory
        for ctx in index._contexts.values():
            for hold in ctx.holdings.values():
                rows = hold.engine_map
                if any(row[1] is not None and row[1] not in rows for row in rows.values()):
                    return False
        return True
    from edgellm.kvindex.redis_audit import orphan_rows

    return orphan_rows(index) == 0
