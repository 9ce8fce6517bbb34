"""The prefix hash chain: this index's own name for "these tokens, after that prefix".

For every *full* block of ``block_size`` tokens, in order::

    prefix_hash[i] = xxhash64(seed, le64(prefix_hash[i-1]) || be32(token) for each token)

with ``prefix_hash[-1] = seed`` (the root parent). ``le64`` is the parent hash as 8 bytes
little-endian, ``be32`` each token id as 4 bytes big-endian (AIBrix ``convertTokenIDs``).
A trailing partial block is never hashed. The same function hashes the blocks an engine
reports and the prompt a router scores, so a prompt's i-th hash equals the hash of the
block an engine stored for the same i+1 blocks of tokens, whatever engine it came from
(engine block hashes, in contrast, are seeded at random per engine process).

The seed must be the same for every router replica that shares an index (Redis), so it is
a fixed constant unless configured (AIBrix draws it at random per process, which is fine
only for a private index).

The chain runs in C (``_rows.chain_hashes``, XXH64 from its specification; tests check it
against the ``xxhash`` package). The index backends' store paths inline :func:`chain` in
their hot loops; tests check that they agree with :func:`prefix_hashes`.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Sequence

from xxhash import xxh64_intdigest

from edgellm.kvindex._rows import chain_hashes, pack_tokens

__all__ = [
    "DEFAULT_SEED",
    "block_bytes",
    "chain",
    "chain_packer",
    "engine_key",
    "engine_keys",
    "prefix_hashes",
]

DEFAULT_SEED = 0x9E3779B97F4A7C15
"""The default seed (the 64-bit golden ratio): fixed so that replicas agree."""

_U64 = (1 << 64) - 1


@lru_cache(maxsize=64)
def chain_packer(block_size: int):
    """``pack(parent_hash, block_bytes) -> bytes``: the xxhash64 input of one block."""
    return struct.Struct(f"<Q{4 * block_size}s").pack


@lru_cache(maxsize=1024)
def _splitter(block_size: int, n_blocks: int):
    return struct.Struct(f"{4 * block_size}s" * n_blocks).unpack


def block_bytes(token_ids: Sequence[int], block_size: int, n_blocks: int) -> tuple[bytes, ...]:
    """The first ``n_blocks`` full blocks of ``token_ids``, each as big-endian uint32 ids.

    Raises ``ValueError`` if a token id is not an int (a ``bool`` is not a token id) in
    ``0 .. 2**32-1`` or there are fewer than ``n_blocks * block_size`` tokens.
    """
    n_tokens = n_blocks * block_size
    if len(token_ids) < n_tokens:
        raise ValueError(f"{n_blocks} blocks of {block_size} need {n_tokens} tokens")
    if n_blocks == 0:
        return ()
    if type(token_ids) not in (list, tuple):
        token_ids = list(token_ids)
    try:
        data = pack_tokens(token_ids, n_tokens)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"bad token id: {exc}") from None
    if n_blocks == 1:
        return (data,)
    return _splitter(block_size, n_blocks)(data)


def chain(blocks: Sequence[bytes], block_size: int, seed: int = DEFAULT_SEED,
          parent: int | None = None) -> list[int]:
    """Prefix hashes of ``blocks`` (from :func:`block_bytes`) chained on ``parent``.

    ``parent`` is the prefix hash of the block before the first one (``None``: a root chain,
    whose parent is the seed).
    """
    pack = chain_packer(block_size)
    h = seed if parent is None else parent
    # A comprehension (h assigned in it) runs ~6% faster than a loop with append.
    return [h := xxh64_intdigest(pack(h, data), seed) for data in blocks]


def prefix_hashes(token_ids: Sequence[int], block_size: int, seed: int = DEFAULT_SEED,
                  parent: int | None = None) -> list[int]:
    """The prefix hash of every full block of ``token_ids`` (a partial tail is left out).

    Raises ``ValueError`` for ``block_size < 1``, a seed or parent outside uint64, or a
    token id outside uint32.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    if not 0 <= seed <= _U64 or (parent is not None and not 0 <= parent <= _U64):
        raise ValueError("seed and parent must be unsigned 64-bit integers")
    n_blocks = len(token_ids) // block_size
    if n_blocks == 0:
        return []
    if type(token_ids) not in (list, tuple):
        token_ids = list(token_ids)
    try:
        data = pack_tokens(token_ids, n_blocks * block_size)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"bad token id: {exc}") from None
    return chain_hashes(data, block_size, seed, seed if parent is None else parent)


def engine_keys(block_hashes: Sequence[int]) -> Sequence[int]:
    """Engine block hashes as the index keys them: as they are when they fit in 64 bits,
    else (32-byte digests: current vLLM's sha256) their low 64 bits.

    A digest read as an int costs 60 bytes in CPython, its low 64 bits 36: this is most of
    what a digest-hashing engine's blocks would cost beyond the ~150-byte budget. The bits
    of a digest are uniform, so two of one pod's blocks share their low 64 bits with odds
    of ~n**2 / 2**65 (and only that pod's removal bookkeeping would be confused). An engine
    uses one kind of hash, so looking at the first one is enough.
    """
    if block_hashes and block_hashes[0] > _U64:
        return [h & _U64 for h in block_hashes]
    return block_hashes


def engine_key(block_hash: int) -> int:
    """:func:`engine_keys` of one hash (an event's parent)."""
    return block_hash & _U64 if block_hash > _U64 else block_hash
