"""vLLM's block hash chain with ``sha256_cbor`` (``vllm/v1/core/kv_cache_utils.py``).

``hash(block) = sha256(cbor2.dumps((parent_hash or NONE_HASH, tuple(token_ids), extra_keys),
canonical=True))``, where ``NONE_HASH = sha256_cbor(seed)`` and the seed is
``$PYTHONHASHSEED`` when set, else ``"vllm-none-hash"`` (vLLM's fixed seed for cryptographic
hashes, so that separate processes agree). ``extra_keys`` is ``None`` unless the request has
a ``cache_salt``, which joins the first block's keys only (the chain carries it onward).

KV events carry the digest's last 8 bytes read as an unsigned big-endian int
(:func:`event_hash`), as vLLM does with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import cbor2

DEFAULT_SEED = "vllm-none-hash"
_U64 = (1 << 64) - 1


def sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def none_hash(seed: str | None = None) -> bytes:
    """The chain's root: ``sha256_cbor`` of ``seed`` (default: ``$PYTHONHASHSEED`` or vLLM's
    fixed seed)."""
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED")
        if seed is None:
            seed = DEFAULT_SEED
    return sha256_cbor(seed)


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_keys: tuple | None,
               root: bytes) -> bytes:  # fmt: skip
    """One block's hash; ``parent`` None for the first block (``root`` stands in)."""
    return sha256_cbor((parent or root, tuple(token_ids), extra_keys))


def first_block_keys(cache_salt: str | None) -> tuple | None:
    """The extra keys of a request's first block (vLLM: the cache salt, if any)."""
    return (cache_salt,) if cache_salt else None


def event_hash(digest: bytes) -> int:
    """The block hash as KV events carry it: the digest's low 64 bits, unsigned."""
    return int.from_bytes(digest[-8:], "big") & _U64


class BlockHasher:
    """The hashes of a growing token sequence's full blocks, extended as tokens arrive."""

    __slots__ = ("block_size", "salt", "root", "hashes")

    def __init__(self, block_size: int, root: bytes, cache_salt: str | None = None):
        self.block_size = block_size
        self.salt = cache_salt
        self.root = root
        self.hashes: list[bytes] = []

    def extend(self, token_ids: Sequence[int]) -> None:
        """Hash every full block of ``token_ids`` not hashed yet."""
        bs = self.block_size
        hashes = self.hashes
        for i in range(len(hashes), len(token_ids) // bs):
            extra = first_block_keys(self.salt) if i == 0 else None
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, token_ids[i * bs : (i + 1) * bs], extra, self.root))
