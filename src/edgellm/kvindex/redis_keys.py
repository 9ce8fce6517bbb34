"""Where the Redis backend's keys live: shards, scopes and placement.

A *shard* is the unit of atomicity: every key a script touches is in one shard, whose key
prefix ``S`` carries a hash tag (``{...}``) so that Redis Cluster puts the whole shard in
one slot. Keys of shard ``S`` (``redis_lua.py`` has the encodings):

=========================  ======  ======================================================
``S:x:<b>``                hash    prefix hash -> its holders' slots (a bitmap), for the
                                   prefixes of one chunk of 16 chain positions, ``b``
                                   naming the chunk (``redis_lua.py``)
``S:e:<slot>``             hash    the pod's engine hash -> row
``S:ls``                   hash    the shard's count of distinct prefixes (``x``)
``S:free``                 zset    slots free for reuse (lowest first)
``S:s`` / ``S:r``          hash    pod -> slot / slot -> pod
``S:o|d|t:<slot>``         hash    orphans, prefixes held twice, touches (``memory_lru``)
``S:lv``                   zset    the shard's leaf rows by recency (its eviction queue)
``S:f`` / ``S:q``          hash    pod -> lease epoch of its writer (fence) / pod -> the
                                   sequence number committed with its last batch
``S:stall``                hash    pods whose pipelined batches wait for a rehash
=========================  ======  ======================================================

and of its *scope* ``G`` (what one budget covers): ``G:n`` (counters: blocks, tick, slot
ids, evictions...), ``G:lv`` (leaves of the whole scope), ``G:lru`` (shards by last access),
``G:bs`` / ``G:ctx`` (a shard's block size / context), ``G:pc:<pod>`` (a pod's shards).

Placement:

- one Redis (``standalone``): ``G`` is the namespace and a shard is a context. Scripts
  may touch any key there, so the budget, the clock and the max-contexts rule span every
  context exactly as in the memory backend (the property test holds Redis to that).
- Redis Cluster, ``context`` placement: a shard is a context and ``G = S``: a lookup is one
  script on one master, but one model's index lives on one master, and the budget
  (``max_blocks``) and clock are per context. The namespace's shard registry
  (``{ns}:reg``, its own slot) lists the contexts for sweeps, stats and clears.
- Redis Cluster, ``pod`` placement: a context is split over ``pod_groups`` shards by a hash
  of the pod key (``G = S`` again): writes and memory spread over the masters, and a
  lookup is one script per shard, sent to every master at once (a pipeline per node) and
  merged; each shard's budget is ``max_blocks / pod_groups``. Each shard learns the
  context's block size from its own first store (pods of one model disagreeing on it are
  caught per shard only).

Redis Cluster keeps no per-pod set of shards across slots: clearing a pod everywhere asks
every shard in the registry.
"""

from __future__ import annotations

from xxhash import xxh64_intdigest

__all__ = ["Placement"]

PLACEMENTS = ("context", "pod")


class Placement:
    """Shard prefixes and scopes of one namespace (see the module docstring)."""

    def __init__(self, namespace: str, *, cluster: bool, placement: str = "context",
                 pod_groups: int = 12) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if pod_groups < 1:
            raise ValueError("pod_groups must be >= 1")
        self.ns = namespace
        self.cluster = cluster
        self.placement = placement if cluster else "context"
        self.groups = pod_groups if self.placement == "pod" else 1
        self.registry = f"{{{namespace}}}:reg"
        """Cluster only: shard prefix -> ``[model, lora]`` JSON (for sweeps, stats, clears)."""

    def shard(self, cid: str, pod_key: str) -> str:
        """The shard holding ``pod_key``'s entries of context ``cid``."""
        if self.groups == 1:
            return f"{self.ns}:{{{cid}}}"
        return f"{self.ns}:{{{cid}:{xxh64_intdigest(pod_key.encode()) % self.groups}}}"

    def shards(self, cid: str) -> list[str]:
        """Every shard of context ``cid`` (a lookup asks each)."""
        if self.groups == 1:
            return [f"{self.ns}:{{{cid}}}"]
        return [f"{self.ns}:{{{cid}:{g}}}" for g in range(self.groups)]

    def scope(self, shard: str) -> str:
        return shard if self.cluster else self.ns

    def share(self, limit: int) -> int:
        """A per-scope share of an index-wide limit (pod placement splits it)."""
        return max(1, limit // self.groups)
