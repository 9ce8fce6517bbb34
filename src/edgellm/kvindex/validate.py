"""Argument checks shared by every index backend, so that they reject the same calls alike.

Each check returns the normalised value or raises :class:`edgellm.kvindex.api.IndexInputError`
naming the argument. They are cheap (a few type tests per call, C-level conversions per
token or hash) because they run on the ingest path.

Normalisation: engine block hashes above 64 bits (32-byte digests) become their low 64 bits
(:func:`edgellm.kvindex.hashing.engine_keys`); ``block_size`` ``None`` becomes the
configured default.

Token ids are packed and checked in C (``_rows.pack_tokens``): a ``bool`` is refused like a
float (``True`` is an ``int`` to Python, but no token id).
"""

from __future__ import annotations

import json
from array import array
from typing import Iterable, Sequence

from xxhash import xxh64_hexdigest

from edgellm.kvindex._rows import pack_tokens
from edgellm.kvindex.api import ContextKey, IndexInputError
from edgellm.kvindex.hashing import engine_key, engine_keys

__all__ = [
    "check_context",
    "check_event",
    "check_hashes",
    "check_pod",
    "check_ready",
    "context_id",
    "prompt_bytes",
]

_SEQUENCES = (list, tuple)
_U64 = (1 << 64) - 1


def check_context(context: object) -> ContextKey:
    """``(model_name: str, lora_id: int)``; ``lora_id`` ``-1`` is the base model."""
    if (type(context) is not tuple or len(context) != 2 or type(context[0]) is not str
            or type(context[1]) is not int):
        raise IndexInputError(
            f"context must be a (model_name: str, lora_id: int) tuple, got {context!r:.80}")
    return context  # type: ignore[return-value]


def check_pod(pod_key: object) -> str:
    if type(pod_key) is not str or not pod_key:
        raise IndexInputError(f"pod_key must be a non-empty str, got {pod_key!r:.80}")
    return pod_key


def check_hashes(block_hashes: object) -> Sequence[int]:
    """A list or tuple of non-negative ints; digests above 64 bits become their low 64."""
    if type(block_hashes) not in _SEQUENCES:
        raise IndexInputError(
            f"block_hashes must be a list of ints, got {type(block_hashes).__name__}")
    try:
        array("Q", block_hashes)  # C-level: rejects floats, strs, negatives, > 64 bits
    except TypeError:
        raise IndexInputError("block_hashes must hold ints") from None
    except OverflowError:
        block_hashes = engine_keys(block_hashes)  # type: ignore[arg-type]
        try:
            array("Q", block_hashes)
        except (OverflowError, TypeError):
            raise IndexInputError("block_hashes must hold non-negative ints") from None
    return block_hashes  # type: ignore[return-value]


def check_event(context: object, pod_key: object, block_hashes: object, parent: object,
                token_ids: object, block_size: object,
                default_block_size: int) -> tuple[Sequence[int], int | None, int]:
    """The arguments of ``process_block_stored``: ``(block_hashes, parent, block_size)``
    normalised. Token ids are only type-checked here (a list or tuple); their values are
    checked when they are packed (an engine's bad tokens are counted, not raised)."""
    check_context(context)
    check_pod(pod_key)
    if block_size is None:
        block_size = default_block_size
    elif type(block_size) is not int or block_size < 1:
        raise IndexInputError(f"block_size must be a positive int, got {block_size!r:.40}")
    if type(token_ids) not in _SEQUENCES:
        raise IndexInputError(
            f"token_ids must be a list of ints, got {type(token_ids).__name__}")
    if parent is not None:
        if type(parent) is not int or parent < 0:
            raise IndexInputError(
                f"parent_block_hash must be None or a non-negative int, got {parent!r:.40}")
        if parent > _U64:
            parent = engine_key(parent)
    return check_hashes(block_hashes), parent, block_size  # type: ignore[return-value]


def prompt_bytes(token_ids: object) -> bytes:
    """Every token id of a prompt as 4 big-endian bytes (the hash chain's input).

    Raises :class:`IndexInputError` unless ``token_ids`` is a list or tuple of ints in
    ``0 .. 2**32-1``: a prompt with a token no engine can have is the caller's mistake, so
    it is refused whole rather than matched up to the bad token.
    """
    if type(token_ids) not in _SEQUENCES:
        raise IndexInputError(
            f"token_ids must be a list of ints, got {type(token_ids).__name__}")
    try:
        return pack_tokens(token_ids)
    except TypeError as exc:
        raise IndexInputError(f"token_ids must hold ints: {exc}") from None
    except OverflowError as exc:
        raise IndexInputError(f"token_ids must hold ints in 0..2**32-1: {exc}") from None


def check_ready(ready_pods: Iterable[str] | None) -> tuple[str, ...] | None:
    """``None`` (every pod of the context) or a tuple of pod keys."""
    if ready_pods is None:
        return None
    if isinstance(ready_pods, (str, bytes)):
        raise IndexInputError("ready_pods must be an iterable of pod keys, not a string")
    try:
        ready = tuple(ready_pods)
    except TypeError:
        raise IndexInputError("ready_pods must be None or an iterable of pod keys") from None
    for pod in ready:
        if type(pod) is not str:
            raise IndexInputError(f"ready_pods must hold str pod keys, got {pod!r:.40}")
    return ready


def context_id(context: ContextKey) -> str:
    """A context's stable id: 16 hex digits of xxh64 over ``[model, lora]`` as JSON. Both
    backends order contexts by it where their last-access times tie (max-contexts victim)."""
    return xxh64_hexdigest(json.dumps([context[0], context[1]]).encode())
