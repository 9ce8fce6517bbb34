"""The block pool against a model of its rules, driven by random operations (hypothesis).

Rules checked after every operation: referenced blocks are never evicted; a cached block's
parent is cached as long as it is; eviction takes leaves before their parents; the KV events
emitted so far, replayed, give exactly the pool's published cached set (every stored hash
removed at most once, never stored twice while cached); a salted request's blocks are
cached but never published.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgellm.engine.block_hash import BlockHasher, event_hash, none_hash
from edgellm.engine.block_pool import BlockPool, PoolExhausted
from edgellm.protocol.kv_event_types import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4
ROOT = none_hash("test")


class PoolMachine(RuleBasedStateMachine):
    """Requests over a small vocabulary (so prefixes collide) allocate, fill and free blocks."""

    @initialize(num_blocks=st.integers(2, 12))
    def setup(self, num_blocks):
        self.pool = BlockPool(num_blocks, BS)
        self.live: dict[int, dict] = {}
        self.next_id = 0
        self.replayed: dict[int, int | None] = {}  # event hash -> parent event hash

    def _replay(self):
        for ev in self.pool.take_events():
            if isinstance(ev, BlockStored):
                parent = ev.parent_block_hash
                assert parent is None or parent in self.replayed, "stored under an unknown parent"
                for h in ev.block_hashes:
                    assert h not in self.replayed, "stored twice without a removal"
                    self.replayed[h] = parent
                    parent = h
                assert len(ev.token_ids) == len(ev.block_hashes) * BS
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    assert h in self.replayed, "removed what was never stored"
                    assert h not in self.replayed.values(), "a parent removed before its child"
                    del self.replayed[h]
            elif isinstance(ev, AllBlocksCleared):
                self.replayed.clear()

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=5 * BS),
          salt=st.sampled_from([None, None, "tenant"]))
    def admit(self, tokens, salt):
        hasher = BlockHasher(BS, ROOT, salt)
        hasher.extend(tokens)
        usable = (len(tokens) - 1) // BS
        hits = self.pool.lookup(hasher.hashes[:usable])
        need = -(-len(tokens) // BS) - len(hits)
        free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if need > self.pool.num_free - free_hits:
            return
        self.pool.touch(hits)
        table = list(hits) + self.pool.allocate(need)
        self.live[self.next_id] = {"table": table, "tokens": tokens, "hasher": hasher,
                                   "cached": len(hits)}  # fmt: skip
        self.next_id += 1
        self._replay()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute(self, data):
        """The request's KV is computed: its full blocks are cached."""
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live[rid]
        full = len(req["tokens"]) // BS
        if full > req["cached"]:
            self.pool.cache_full(req["table"], req["cached"], full, req["hasher"].hashes,
                                 req["tokens"], private=req["hasher"].salt is not None)  # fmt: skip
            req["cached"] = full
        self._replay()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.pool.free(self.live.pop(rid)["table"])
        self._replay()

    @rule()
    def reset(self):
        done = self.pool.reset()
        assert done == (not self.live)
        self._replay()

    @rule(n=st.integers(1, 4))
    def allocate_and_release(self, n):
        try:
            blocks = self.pool.allocate(n)
        except PoolExhausted:
            assert n > self.pool.num_free
            return
        self.pool.free(blocks)
        self._replay()

    @invariant()
    def consistent(self):
        if not hasattr(self, "pool"):
            return
        pool = self.pool
        cached = pool.cached_hashes(published_only=True)
        assert set(cached) == set(self.replayed), "events do not replay to the published set"
        for block in pool.cached_hashes().values():  # a salted chain stays private throughout
            if block.parent is not None:
                assert block.parent.private == block.private
        in_use = {id(b) for req in self.live.values() for b in req["table"]}
        for block in pool.blocks:
            assert block.ref_cnt == sum(1 for req in self.live.values() for b in req["table"]
                                        if b is block)  # fmt: skip
            if block.ref_cnt:
                assert id(block) in in_use
            if block.block_hash is not None and block.parent is not None:
                assert block.parent.block_hash is not None
        children = {}
        for block in pool.blocks:
            if block.parent is not None:
                children[id(block.parent)] = children.get(id(block.parent), 0) + 1
        for block in pool.blocks:
            assert block.children == children.get(id(block), 0)
        assert pool.num_free == sum(1 for b in pool.blocks if b.ref_cnt == 0)
        for req in self.live.values():  # a live request's cached prefix is still cached
            for i in range(req["cached"]):
                assert req["table"][i].block_hash == req["hasher"].hashes[i]


TestBlockPool = PoolMachine.TestCase
TestBlockPool.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_eviction_takes_leaves_first_and_never_blocks_in_use():
    pool = BlockPool(4, BS)
    hasher = BlockHasher(BS, ROOT)
    tokens = list(range(3 * BS))
    hasher.extend(tokens)
    table = pool.allocate(3)
    pool.cache_full(table, 0, 3, hasher.hashes, tokens)
    pool.free(table)
    pool.take_events()
    keep = pool.allocate(1)  # the one plain block first: nothing evicted
    assert keep[0].block_id == 3 and pool.take_events() == []
    second = pool.allocate(1)
    (removed,) = pool.take_events()
    assert removed.block_hashes == [event_hash(hasher.hashes[2])]  # the leaf
    assert second[0] is table[2]


def test_the_same_content_computed_twice_is_stored_once():
    pool = BlockPool(6, BS)
    hasher = BlockHasher(BS, ROOT)
    tokens = list(range(2 * BS))
    hasher.extend(tokens)
    a = pool.allocate(2)
    b = pool.allocate(2)
    pool.cache_full(a, 0, 2, hasher.hashes, tokens)
    pool.cache_full(b, 0, 2, hasher.hashes, tokens)
    stored = [e for e in pool.take_events() if isinstance(e, BlockStored)]
    assert [h for e in stored for h in e.block_hashes] == [event_hash(h) for h in hasher.hashes]
    assert b == a  # b now shares a's blocks; its own went back to the pool
    assert pool.num_free == 6 - 2 and a[0].ref_cnt == 2


def test_requests_growing_together_keep_contiguous_blocks():
    """Four requests admitted side by side then growing one block at a time each end up in
    few physically contiguous runs, not interleaved block by block."""
    pool = BlockPool(200, BS)
    tables = [pool.allocate(5) for _ in range(4)]
    for _ in range(12):
        for table in tables:
            table.extend(pool.allocate(1, near=table[-1].block_id))
    for table in tables:
        ids = sorted(b.block_id for b in table)
        runs = 1 + sum(1 for a, b in zip(ids, ids[1:]) if b != a + 1)
        assert runs <= 2, ids
    assert len({b.block_id for t in tables for b in t}) == 4 * 17  # no block twice


def test_placement_never_hands_out_a_block_twice():
    pool = BlockPool(40, BS)
    a = pool.allocate(10)
    b = pool.allocate(3)
    pool.free(a[3:7])  # a hole of 4 after a[2]
    grown = pool.allocate(6, near=a[2].block_id)
    ids = [x.block_id for x in grown]
    assert ids[:4] == [a[3].block_id + i for i in range(4)] and len(set(ids)) == 6
    assert not set(ids) & {x.block_id for x in a[:3] + a[7:] + b}
