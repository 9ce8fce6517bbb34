"""Matching a prompt against the in-memory index (``MemoryPrefixIndex.match_prefix``).

Reads only: safe on any thread while the index's writer works (see ``memory.py``).
"""

from __future__ import annotations

from itertools import chain, compress, count, repeat
from operator import and_, ne
from typing import Sequence

from xxhash import xxh3_128_intdigest

from edgellm.kvindex._rows import chain_hashes
from edgellm.kvindex.memory_tables import FIRST_CHUNK, KEY_MASK, LOW, MATCH_CHUNK, Context


class PromptMatcher:
    """Walks a prompt's hash chain through a context's index, with a cache of chunks."""

    def __init__(self, seed: int, cache_chunks: int) -> None:
        self._seed = seed
        self.match_cache_chunks = cache_chunks
        self._cache: dict[tuple[int, int], tuple[tuple[int, ...], int]] = {}

    def walk(self, ctx: Context, data: bytes, n_blocks: int,
             alive: int) -> tuple[dict[int, int], list[int]]:
        """``(slot -> consecutive blocks held from the start, keys)`` for the slots in
        ``alive``; ``data`` is the prompt as validated big-endian token bytes and ``keys``
        the index keys of the blocks walked (so a pod's last matched block is
        ``keys[count - 1]``).

        Only the hash chain runs per block in Python (and not even that for a chunk seen
        before); per chunk the values are fetched and masked with ``map`` and only the
        positions where the mask changes are looked at, found with C-level ``compress``.
        (The top-bit check a store makes is left out here: a 60-bit key collision
        misleads one routing decision, with odds of 2**-60 per pair of blocks.)
        """
        get = ctx.index.get
        matched: dict[int, int] = {}
        walked: list[int] = []
        h = self._seed
        done = 0
        width = 4 * ctx.block_size
        # Holder masks are compared shifted into place (``value & alive``): no shift per
        # value, and the low bits drop out, so a chunk's values collapse to the few
        # distinct holder sets that matter.
        alive <<= LOW
        while done < n_blocks:
            step = min(MATCH_CHUNK if done else FIRST_CHUNK, n_blocks - done)
            keys, h = self._chunk_keys(ctx, data[done * width:(done + step) * width], step, h)
            values = list(map(get, keys))
            if not all(values):  # values are ints > 0: a None ends the match
                values = values[: values.index(None)]
            if not values:
                break
            walked.extend(keys if len(values) == len(keys) else keys[: len(values)])
            masked = list(map(and_, values, repeat(alive, len(values))))
            # A pod drops out where its bit first goes missing, which is where the mask
            # changes: only those positions (found in C) are looked at, in order (a mask
            # seen before changes nothing: AND is idempotent). Most chunks have one mask
            # throughout: ``count`` sees that cheaply.
            starts = ((0,) if masked.count(masked[0]) == len(masked)
                      else chain((0,), compress(count(1), map(ne, masked[1:], masked))))
            for at in starts:
                still = alive & masked[at]
                if still != alive:
                    at += done
                    if at:
                        gone = alive ^ still
                        if gone & (gone - 1):  # several pods stop here
                            while gone:
                                low = gone & -gone
                                matched[low.bit_length() - 1 - LOW] = at
                                gone ^= low
                        else:  # one pod: the usual case
                            matched[gone.bit_length() - 1 - LOW] = at
                    alive = still
                    if not alive:
                        return matched, walked
            done += len(values)
            if len(values) < step or not alive:
                break
        while alive and done:
            low = alive & -alive
            matched[low.bit_length() - 1 - LOW] = done
            alive ^= low
        return matched, walked

    def _chunk_keys(self, ctx: Context, data: bytes, n_blocks: int,
                    h: int) -> tuple[Sequence[int], int]:
        """Index keys of ``n_blocks`` blocks chained on ``h``, and the last block's hash.

        Prompts repeat chunks (shared system prompts, every earlier turn of a chat), so the
        keys of a chunk are cached under an xxh3-128 digest of its bytes seeded with the
        parent hash: a hit costs one pass over the bytes instead of the chain's xxh64s.
        """
        limit = self.match_cache_chunks
        if limit > 0:
            cache_key = (xxh3_128_intdigest(data, h), ctx.block_size)
            cached = self._cache.get(cache_key)
            if cached is not None:
                return cached
        hashes = chain_hashes(data, ctx.block_size, self._seed, h)
        result = (tuple([x & KEY_MASK for x in hashes]), hashes[-1])
        if limit > 0:
            cache = self._cache
            while len(cache) >= limit:
                try:  # reader threads may race here: losing an entry is harmless
                    del cache[next(iter(cache))]
                except (KeyError, RuntimeError, StopIteration):
                    break
            cache[cache_key] = result
        return result
