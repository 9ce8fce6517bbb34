"""vLLM's sha256_cbor chain, checked against a CBOR encoding written here from RFC 8949."""

from __future__ import annotations

import hashlib
import struct

import pytest

from edgellm.engine.block_hash import (BlockHasher, DEFAULT_SEED, event_hash, hash_block,
                                       none_hash)  # fmt: skip


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError(n)


def _cbor(x) -> bytes:
    """Deterministic CBOR (RFC 8949 §4.2.1) of the types a block hash uses."""
    if x is None:
        return b"\xf6"
    if isinstance(x, int):
        return _head(0, x) if x >= 0 else _head(1, -1 - x)
    if isinstance(x, bytes):
        return _head(2, len(x)) + x
    if isinstance(x, str):
        data = x.encode()
        return _head(3, len(data)) + data
    if isinstance(x, (tuple, list)):
        return _head(4, len(x)) + b"".join(_cbor(i) for i in x)
    raise TypeError(type(x))


def _h(x) -> bytes:
    return hashlib.sha256(_cbor(x)).digest()


def test_root_is_sha256_of_the_cbor_seed(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert none_hash() == _h(DEFAULT_SEED)
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    assert none_hash() == _h("42")


def test_chain_matches_an_independent_encoding():
    root = _h(DEFAULT_SEED)
    tokens = list(range(1000, 1016)) + [70000, 5, 0, 23, 24, 255, 256, 65535, 65536, 1 << 32 - 1,
                                        9, 9, 9, 9, 9, 9]  # fmt: skip
    first = hash_block(None, tokens[:16], None, root)
    assert first == _h((root, tuple(tokens[:16]), None))
    second = hash_block(first, tokens[16:], None, root)
    assert second == _h((first, tuple(tokens[16:]), None))
    hasher = BlockHasher(16, root)
    hasher.extend(tokens + [1, 2, 3])  # a partial third block is not hashed
    assert hasher.hashes == [first, second]


def test_cache_salt_joins_the_first_block_only():
    root = _h(DEFAULT_SEED)
    tokens = list(range(32))
    salted = BlockHasher(16, root, "tenant-a")
    salted.extend(tokens)
    plain = BlockHasher(16, root)
    plain.extend(tokens)
    assert salted.hashes[0] == _h((root, tuple(range(16)), ("tenant-a",)))
    assert salted.hashes[1] == _h((salted.hashes[0], tuple(range(16, 32)), None))
    assert salted.hashes[0] != plain.hashes[0] and salted.hashes[1] != plain.hashes[1]


@pytest.mark.parametrize("digest", [bytes(range(32)), b"\xff" * 32, b"\x00" * 24 + b"\x80" + b"\x00" * 7])
def test_event_hash_is_the_low_64_bits_unsigned(digest):
    assert event_hash(digest) == int.from_bytes(digest, "big") % (1 << 64)
    assert 0 <= event_hash(digest) < 1 << 64
