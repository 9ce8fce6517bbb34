"""Matching a prompt against the in-memory index (``MemoryPrefixIndex.match_prefix``).

Reads only: safe on any thread while the index's writer works (see ``memory.py``).
"""

from __future__ import annotations

from typing import Sequence

from xxhash import xxh3_128_intdigest, xxh64_intdigest

from edgellm.kvindex.hashing import _splitter
from edgellm.kvindex.memory_tables import (
    FIRST_CHUNK,
    KEY_MASK,
    LOW,
    MATCH_CHUNK,
    Context,
    token_bytes,
)


class PromptMatcher:
    """Walks a prompt's hash chain through a context's index, with a cache of chunks."""

    def __init__(self, seed: int, cache_chunks: int) -> None:
        self._seed = seed
        self.match_cache_chunks = cache_chunks
        self._cache: dict[tuple[int, int], tuple[tuple[int, ...], int]] = {}

    def walk(self, ctx: Context, token_ids: Sequence[int], n_blocks: int,
              alive: int) -> dict[int, int]:
        """Slot -> consecutive blocks held from the start, for the slots in ``alive``.

        Only the hash chain runs per block in Python (and not even that for a chunk seen
        before); per chunk the values are fetched with ``map`` and only their distinct
        values are looked at, where pods drop out found with C-level ``index`` calls. (The top-bit check a store makes is left
        out here: a 60-bit key collision misleads one routing decision, with odds of 2**-60
        per pair of blocks.)
        """
        bs = ctx.block_size
        get = ctx.index.get
        matched: dict[int, int] = {}
        h = self._seed
        done = 0
        rest = b""  # the tokens after the first chunk, converted at once if it all matched
        width = 4 * bs
        while done < n_blocks:
            step = min(MATCH_CHUNK if done else FIRST_CHUNK, n_blocks - done)
            try:
                if not done:
                    data = token_bytes(token_ids[: step * bs])
                else:
                    if not rest:
                        rest = token_bytes(token_ids[done * bs:n_blocks * bs])
                    offset = (done - FIRST_CHUNK) * width
                    data = rest[offset:offset + step * width]
            except (OverflowError, TypeError):
                break  # a token no engine can have stored: nothing matches past it
            keys, h = self._chunk_keys(ctx, data, step, h)
            values = list(map(get, keys))
            if None in values:
                values = values[: values.index(None)]
            # A value only matters where it first appears (AND is idempotent), so walk the
            # distinct values in order of appearance: a handful per chunk, found in C. Most
            # chunks have one (the same holders throughout): ``count`` sees that cheaply.
            distinct = ((values[0],) if values and values.count(values[0]) == len(values)
                        else dict.fromkeys(values))
            for value in distinct:
                still = alive & (value >> LOW)
                if still != alive:
                    at = done + values.index(value)
                    gone = alive ^ still
                    while gone:
                        low = gone & -gone
                        if at:
                            matched[low.bit_length() - 1] = at
                        gone ^= low
                    alive = still
                    if not alive:
                        return matched
            done += len(values)
            if len(values) < step or not alive:
                break
        while alive and done:
            low = alive & -alive
            matched[low.bit_length() - 1] = done
            alive ^= low
        return matched

    def _chunk_keys(self, ctx: Context, data: bytes, n_blocks: int,
                    h: int) -> tuple[Sequence[int], int]:
        """Index keys of ``n_blocks`` blocks chained on ``h``, and the last block's hash.

        Prompts repeat chunks (shared system prompts, every earlier turn of a chat), so the
        keys of a chunk are cached under an xxh3-128 digest of its bytes seeded with the
        parent hash: a hit costs one pass over the bytes instead of one xxh64 per block.
        """
        limit = self.match_cache_chunks
        if limit > 0:
            cache_key = (xxh3_128_intdigest(data, h), ctx.block_size)
            cached = self._cache.get(cache_key)
            if cached is not None:
                return cached
        seed = self._seed
        pack = ctx.pack_chain
        keys = []
        append = keys.append
        blocks = (data,) if n_blocks == 1 else _splitter(ctx.block_size, n_blocks)(data)
        for block in blocks:
            h = xxh64_intdigest(pack(h, block), seed)
            append(h & KEY_MASK)
        result = (tuple(keys), h)
        if limit > 0:
            cache = self._cache
            while len(cache) >= limit:
                try:  # reader threads may race here: losing an entry is harmless
                    del cache[next(iter(cache))]
                except (KeyError, RuntimeError, StopIteration):
                    break
            cache[cache_key] = result
        return result
