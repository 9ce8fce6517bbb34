"""The shared block prefix cache: KV blocks, their reference counts, the hash map, eviction.

Pure bookkeeping (no tensors): block ``i`` owns slots ``i*block_size .. (i+1)*block_size-1`` of
the KV tensors (:mod:`edgellm.engine.kv_cache`). As in vLLM v1's ``block_pool.py``:

- a request references the blocks of its block table (``ref_cnt``); a block whose count
  drops to 0 stays *cached* (its hash still maps to it) on the free queue, least recently
  used first, until its slots are needed;
- only full blocks are cached, keyed by their hash chain (:mod:`edgellm.engine.block_hash`);
  a request reuses the longest cached prefix of its blocks (:meth:`BlockPool.lookup`);
- a block that fills with the same content as a cached one is swapped for it
  (:meth:`BlockPool.cache_full`), so one hash maps to one block and is stored once;
- eviction takes the least recently used free block that no other cached block names as
  its parent: leaves go before their parents, always (``children`` counts); blocks in use
  (``ref_cnt > 0``) are never evicted; uncached free blocks are reused first, lowest ids
  first and the block right after ``near`` when it is free, so that a request's blocks tend
  to be physically contiguous (the attention then reads them in place, as one run).

Every change of the cached set becomes a KV event, in order, collected until the engine
drains them once per step (:meth:`BlockPool.take_events`): ``BlockStored`` when blocks
become cached, ``BlockRemoved`` when evicted, ``AllBlocksCleared`` on :meth:`BlockPool.reset`.
Every stored hash gets exactly one removal (or a clear) before it can be stored again.

Blocks of a request with a ``cache_salt`` (a tenant's own prefixes) are *private*: cached and
reused by requests with the same salt (their hashes differ from everyone else's), but never
published: an index that follows the events, and a router reading it, must not learn what a
tenant has cached.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Sequence

from edgellm.engine.block_hash import event_hash
from edgellm.protocol.kv_event_types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

MEDIUM = "CPU"
"""``medium`` of our events: the KV lives in host memory."""


class Block:
    """One block of KV slots."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "parent", "children", "private")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        """The full digest while cached, else None."""
        self.parent: Block | None = None
        """The cached block before this one in its chain (while both are cached)."""
        self.children = 0
        """Cached blocks whose ``parent`` this is: it may not be evicted before them."""
        self.private = False
        """Cached for a salted request: its store and eviction are not published."""

    def __repr__(self) -> str:
        state = "cached" if self.block_hash else "plain"
        return f"<Block {self.block_id} ref={self.ref_cnt} {state} children={self.children}>"


class PoolExhausted(RuntimeError):
    """More blocks were asked for than are free (callers check :attr:`BlockPool.num_free`)."""


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens. Used by the engine thread only."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._plain: list[int] = list(range(num_blocks))
        """Ids of free blocks that hold nothing cached, sorted."""
        self._lru: OrderedDict[int, Block] = OrderedDict()
        """Free blocks that are cached, least recently used first."""
        self._cached: dict[bytes, Block] = {}
        self._events: list[KVEvent] = []
        self.evictions = 0
        self.query_tokens = 0
        self.hit_tokens = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks not referenced by any request (cached or not): what can be allocated."""
        return len(self._plain) + len(self._lru)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by requests (vLLM's ``kv_cache_usage_perc``, 0..1)."""
        return 1.0 - self.num_free / self.num_blocks

    def cached_hashes(self, *, published_only: bool = False) -> dict[int, Block]:
        """Event hash -> block, for every cached block (only those whose events are published:
        what an index following them holds)."""
        return {event_hash(h): b for h, b in self._cached.items()
                if not (published_only and b.private)}  # fmt: skip

    # -- lookups and references ----------------------------------------------------------

    def lookup(self, block_hashes: Sequence[bytes]) -> list[Block]:
        """The cached blocks of the longest prefix of ``block_hashes`` (not referenced yet)."""
        hits = []
        for h in block_hashes:
            block = self._cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def count_query(self, query_tokens: int, hit_tokens: int) -> None:
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    def touch(self, blocks: Sequence[Block]) -> None:
        """Reference ``blocks`` (cache hits): they leave the free queue while in use."""
        for block in blocks:
            if block.ref_cnt == 0:
                if block.block_hash is not None:
                    del self._lru[block.block_id]
                else:  # a hit is cached; only a reset makes an in-table block plain
                    self._take_plain(block.block_id)
            block.ref_cnt += 1

    def allocate(self, n: int, near: int | None = None) -> list[Block]:
        """``n`` blocks for new KV: plain ones first, placed to keep a request's blocks
        physically contiguous (:meth:`_place`), then cached ones evicted least recently used,
        leaves first."""
        if n > self.num_free:
            raise PoolExhausted(f"{n} blocks asked, {self.num_free} free")
        plain = self._plain
        out = []
        if plain:
            for block_id in self._place(min(n, len(plain)), near):
                self._take_plain(block_id)
                out.append(self.blocks[block_id])
        while len(out) < n:
            out.append(self._pop_evictable())
        for block in out:
            block.ref_cnt = 1
        return out

    def _place(self, n: int, near: int | None) -> list[int]:
        """Which ``n`` plain blocks to take: right after ``near`` (the request's last block)
        while those are free; then the first free stretch that holds the rest; a request
        growing by one block whose successor is taken starts anew in the middle of the
        largest free stretch (several growing requests then each grow into a stretch of
        their own instead of taking turns at the lowest free id); failing all that, the
        lowest free ids."""
        plain = self._plain
        out: list[int] = []
        if near is not None:
            i = bisect.bisect_left(plain, near + 1)
            while len(out) < n and i < len(plain) and plain[i] == near + 1 + len(out):
                out.append(plain[i])
                i += 1
            if len(out) == n:
                return out
        need = n - len(out)
        taken = set(out)
        best_start, best_len = -1, 0
        start, length = -2, 0
        for block_id in plain:
            if block_id in taken:
                continue
            if block_id == start + length:
                length += 1
            else:
                start, length = block_id, 1
            if length >= need and near is None:
                return out + list(range(start, start + need))  # first fit, for a new request
            if length > best_len:
                best_start, best_len = start, length
        if near is not None and best_len >= 2 * need:
            middle = best_start + best_len // 2
            return out + list(range(middle, middle + need))
        return out + [b for b in plain if b not in taken][:need]

    def _take_plain(self, block_id: int) -> None:
        i = bisect.bisect_left(self._plain, block_id)
        del self._plain[i]

    def free(self, blocks: Sequence[Block]) -> None:
        """Drop one reference of each block. Pass a request's table in order: it is released
        from the last block back, so its leaves are evicted before its prefix."""
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    bisect.insort(self._plain, block.block_id)
                else:
                    self._lru[block.block_id] = block

    def _pop_evictable(self) -> Block:
        for block in self._lru.values():
            if block.children == 0:
                break
        else:  # unreachable: the deepest free cached block has no cached child in use
            raise PoolExhausted("every free block is the parent of a cached block")
        del self._lru[block.block_id]
        self._evict(block)
        return block

    def _evict(self, block: Block) -> None:
        digest = block.block_hash
        assert digest is not None
        if not block.private:
            self._events.append(BlockRemoved([event_hash(digest)], medium=MEDIUM))
        del self._cached[digest]
        block.block_hash = None
        block.private = False
        if block.parent is not None:
            block.parent.children -= 1
            block.parent = None
        self.evictions += 1

    # -- caching full blocks -------------------------------------------------------------

    def cache_full(self, table: list[Block], start: int, end: int, hashes: Sequence[bytes],
                   token_ids: Sequence[int], lora_id: int | None = None, *,
                   private: bool = False) -> None:  # fmt: skip
        """Blocks ``table[start:end]`` are full and their KV computed: cache them.

        ``hashes`` and ``token_ids`` are the whole sequence's (block hashes from the first
        block). A block whose hash is already cached is replaced in ``table`` by the cached
        block (the same KV) and released. One ``BlockStored`` covers each run of newly cached
        blocks."""
        bs = self.block_size
        run_hashes: list[int] = []
        run_tokens: list[int] = []
        run_parent: int | None = None
        for i in range(start, end):
            digest = hashes[i]
            block = table[i]
            parent = table[i - 1] if i > 0 else None
            existing = self._cached.get(digest)
            if existing is not None:
                if existing is not block:  # the same content computed twice: keep one
                    self.touch([existing])
                    table[i] = existing
                    self.free([block])
                if run_hashes:
                    self._store(run_hashes, run_parent, run_tokens, lora_id)
                    run_hashes, run_tokens = [], []
                continue
            block.block_hash = digest
            block.private = private
            self._cached[digest] = block
            if parent is not None and parent.block_hash is not None:
                block.parent = parent
                parent.children += 1
            if private:
                continue
            if not run_hashes:
                run_parent = event_hash(hashes[i - 1]) if i > 0 else None
            run_hashes.append(event_hash(digest))
            run_tokens.extend(token_ids[i * bs : (i + 1) * bs])
        if run_hashes:
            self._store(run_hashes, run_parent, run_tokens, lora_id)

    def _store(self, hashes: list[int], parent: int | None, tokens: list[int],
               lora_id: int | None) -> None:  # fmt: skip
        self._events.append(BlockStored(hashes, parent, tokens, self.block_size, lora_id, MEDIUM))

    # -- reset and events ----------------------------------------------------------------

    def reset(self) -> bool:
        """Forget every cached block (``AllBlocksCleared``); only while no block is in use (as
        vLLM: a request's later blocks chain on its earlier ones). False if refused."""
        if self.num_free != self.num_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
            block.parent = None
            block.children = 0
            block.private = False
        self._cached.clear()
        self._lru.clear()
        self._plain = list(range(self.num_blocks))
        self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """The events since the last call, in order."""
        events, self._events = self._events, []
        return events
