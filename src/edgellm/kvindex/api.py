"""The contract between the KV event pipeline (``edgellm.kvevents``) and the prefix index.

The event handler of each pod calls these methods, in that pod's sequence order, from one
worker thread per index (calls for different pods may interleave; calls for one pod never
do). The router and the HTTP scoring endpoint call :meth:`PrefixIndex.match_prefix`.

Terms:

- *context*: ``(model_name, lora_id)``; ``lora_id`` is ``-1`` when there is no LoRA adapter.
- *engine block hash*: the hash an engine put in its events. Engines seed their root hash
  at random, so these are only meaningful per pod. The codec normalises them to
  non-negative ``int`` (8-byte digests and signed int64 read as unsigned 64-bit; 32-byte
  digests as a 256-bit int).
- *prefix hash*: this index's own hash of a block's tokens chained on its parent's prefix
  hash (see ``edgellm.kvindex.hashing``), identical for every pod and for prompts.
- *pod_key*: ``namespace/name`` (Kubernetes) or any unique string (static pods, units).

No method here raises on unknown pods or hashes: removing what is not held is a no-op that
is reported in the returned counts. Malformed arguments (a context that is not ``(str,
int)``, a pod key that is not a string, a block size that is not a positive int, token ids
that are not a list, prompt token ids that are not ints in ``0 .. 2**32-1``, bools
included) raise :class:`IndexInputError` from every backend alike
(``edgellm.kvindex.validate``). Such token ids in a BlockStored are the engine's data, not
a caller's mistake: the event is counted (``invalid_tokens``) and not indexed.

Bounds (``IndexConfig``, the same order in every backend, see ``edgellm.kvindex.lru``):
blocks are evicted least-recently-used, leaves before their ancestors, and a match refreshes
the blocks it matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence, runtime_checkable

ContextKey = tuple[str, int]
"""``(model_name, lora_id)``; ``lora_id == -1`` means the base model."""

NO_LORA = -1


class IndexInputError(ValueError):
    """A call to the index with malformed arguments (the message says which)."""


@dataclass(frozen=True, slots=True)
class StoreResult:
    """What :meth:`PrefixIndex.process_block_stored` did with one BlockStored event."""

    stored: int
    """Blocks now recorded as held by the pod."""
    unknown_parent: bool = False
    """The event named a parent block hash this pod never stored (or that was evicted):
    its chain was not indexed, because hashing it as a root would index wrong prefixes.
    The pipeline counts this and may resync the pod."""
    skipped: int = 0
    """Blocks not indexed (unknown parent, partial trailing block, over budget...)."""


@dataclass(frozen=True, slots=True)
class PodMatch:
    """How much of a prompt one pod holds."""

    matched_blocks: int
    """Consecutive full blocks, from the start of the prompt, that the pod holds."""
    percent: float
    """``100 * matched_blocks / prompt_blocks`` (0..100)."""


@runtime_checkable
class PrefixIndex(Protocol):
    """A global index of which pod holds which token prefix."""

    def is_ready(self) -> bool:
        """True once the backend can take calls (the manager's start waits for this)."""

    def process_block_stored(
        self,
        context: ContextKey,
        pod_key: str,
        block_hashes: Sequence[int],
        parent_block_hash: int | None,
        token_ids: Sequence[int],
        block_size: int | None = None,
    ) -> StoreResult:
        """Record that ``pod_key`` now holds these blocks.

        ``token_ids`` is the flat list for all blocks (``len(block_hashes) * block_size``
        long; a shorter list indexes only the full blocks it covers). ``parent_block_hash``
        is the engine hash of the block before the first one, ``None`` for a root chain.
        ``block_size`` ``None``: the configured default (``AIBRIX_PREFIX_CACHE_BLOCK_SIZE``).

        An event that is not indexed (block size differing from the context's, unknown
        parent, invalid tokens, no full block) changes nothing: it creates no context and
        no holding and refreshes no clock; it is counted in :meth:`stats`.
        """

    def process_block_removed(
        self, context: ContextKey | None, pod_key: str, block_hashes: Sequence[int]
    ) -> int:
        """Forget that ``pod_key`` holds these blocks; other pods keep theirs.

        ``context`` may be ``None`` (BlockRemoved does not name a LoRA): engine hashes are
        unique per pod, so the index resolves them through the pod's own map. Returns how
        many were removed; unknown hashes are ignored.
        """

    def clear_pod(self, pod_key: str, context: ContextKey | None = None) -> int:
        """AllBlocksCleared, engine restart or unrecoverable gap: drop the pod's entries
        in ``context`` (all of the pod's contexts when ``None``). Returns how many."""

    def remove_pod(self, pod_key: str) -> int:
        """The pod is gone: drop it everywhere, in time proportional to its own entries."""

    def match_prefix(
        self,
        context: ContextKey,
        token_ids: Sequence[int],
        ready_pods: Iterable[str] | None = None,
    ) -> dict[str, PodMatch]:
        """Per pod (restricted to ``ready_pods`` when given), the consecutive full blocks of
        ``token_ids`` held from the start. Stops hashing at the first block no candidate
        pod holds. Pods with no match are omitted.

        A call on a known context refreshes its idle clock (whatever the prompt); each pod
        in the answer has its matched blocks refreshed for LRU eviction. Raises
        :class:`IndexInputError` for a malformed context, prompt or pod list."""

    def stats(self) -> dict[str, object]:
        """Counts for metrics and benches: contexts, blocks, pods, evictions, bytes..."""

    def close(self) -> None:
        """Release connections and threads; safe to call twice."""


# --- batches (optional: backends where one call per event costs a round trip) -----------

STORED, REMOVED, CLEARED = "stored", "removed", "cleared"
"""Kinds of :class:`IndexBatch` events: ``(STORED, block_hashes, parent_block_hash,
token_ids, block_size)``, ``(REMOVED, block_hashes)``, ``(CLEARED,)``."""


@dataclass(frozen=True, slots=True)
class IndexBatch:
    """One engine batch of one pod, for :meth:`BatchPrefixIndex.apply_batches`.

    Removals and clears apply to the pod's entries in ``context`` (a pipeline follows each
    pod in one context, so this is ``process_block_removed(None, ...)`` there). ``seq``,
    if given, is committed with the batch, with ``digest`` (the batch's, to recognise the
    stream): a new writer resumes after it; ``epoch``, if given, fences the write: refused
    once the pod's fence is above it (a newer writer).
    """

    context: ContextKey
    pod_key: str
    events: Sequence[tuple]
    seq: int | None = None
    epoch: int | None = None
    digest: int | None = None


FENCED = "fenced"
"""The result of a whole :class:`IndexBatch` refused by its fence (nothing applied)."""

BEHIND = "behind"
"""The result of a whole :class:`IndexBatch` refused because the index lost writes of the
pod (the batch committed there is not the one its writer committed last): nothing applied;
the pod's entries must be rebuilt."""


@runtime_checkable
class BatchPrefixIndex(PrefixIndex, Protocol):
    """A :class:`PrefixIndex` that also takes many batches in one call."""

    def apply_batches(self, batches: Sequence[IndexBatch]) -> list[list[object] | str]:
        """Apply ``batches`` in order; per batch :data:`FENCED`, :data:`BEHIND` or its
        events' results in order: a :class:`StoreResult` per STORED, a count per REMOVED / CLEARED, or the
        exception (:class:`IndexInputError`) that stopped the batch there (the events
        after it are not applied). Raises on a backend failure (connection lost): then
        what was applied is unknown, and the pods' entries must be rebuilt."""
