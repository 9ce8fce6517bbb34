"""A small, obviously-correct PrefixIndex (edgellm.kvindex.api) for the pipeline's tests.

Faithful to the contract, not fast: per pod, engine block hash -> (context, prefix hash);
per context, prefix hash -> {pod: holding count}. Prefix hash of a block =
xxh64(parent prefix hash as 8 bytes LE + the block's tokens as 4-byte BE, seed); the root's
parent is the seed. An unknown parent (never stored by this pod, or removed) leaves the
whole chain unindexed and is reported.

``pod_blocks(pod_key)`` exposes what a pod holds, so tests compare it with ground truth.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Iterable, Sequence

import xxhash

from edgellm.kvindex.api import ContextKey, PodMatch, StoreResult
from edgellm.protocol.kv_events import token_block_bytes

SEED = 0x5EED


def prefix_hash(parent: int, block: bytes) -> int:
    return xxhash.xxh64_intdigest(parent.to_bytes(8, "little") + block, seed=SEED)


class ReferenceIndex:
    def __init__(self, ready: bool = True):
        self.ready = ready
        self._lock = threading.Lock()
        self._pods: dict[str, dict[int, tuple[ContextKey, int]]] = defaultdict(dict)
        self._ctx: dict[ContextKey, dict[int, dict[str, int]]] = defaultdict(dict)
        self.calls: list[tuple] = []
        self.closed = False

    def is_ready(self) -> bool:
        return self.ready

    def process_block_stored(self, context, pod_key, block_hashes, parent_block_hash,
                             token_ids, block_size) -> StoreResult:  # fmt: skip
        with self._lock:
            self.calls.append(("stored", pod_key, tuple(block_hashes)))
            held = self._pods[pod_key]
            if parent_block_hash is None:
                parent = SEED
            elif parent_block_hash in held and held[parent_block_hash][0] == context:
                parent = held[parent_block_hash][1]
            else:
                return StoreResult(0, unknown_parent=True, skipped=len(block_hashes))
            blocks = token_block_bytes(list(token_ids), block_size)
            stored = 0
            for h, block in zip(block_hashes, blocks):
                parent = prefix_hash(parent, block)
                self._drop(pod_key, h)
                held[h] = (context, parent)
                pods = self._ctx[context].setdefault(parent, {})
                pods[pod_key] = pods.get(pod_key, 0) + 1
                stored += 1
            return StoreResult(stored, skipped=len(block_hashes) - stored)

    def _drop(self, pod_key: str, h: int) -> bool:
        entry = self._pods[pod_key].pop(h, None)
        if entry is None:
            return False
        context, ph = entry
        pods = self._ctx[context][ph]
        pods[pod_key] -= 1
        if not pods[pod_key]:
            del pods[pod_key]
            if not pods:
                del self._ctx[context][ph]
        return True

    def process_block_removed(self, context, pod_key, block_hashes) -> int:
        with self._lock:
            self.calls.append(("removed", pod_key, tuple(block_hashes)))
            return sum(self._drop(pod_key, h) for h in block_hashes)

    def clear_pod(self, pod_key: str, context: ContextKey | None = None) -> int:
        with self._lock:
            self.calls.append(("clear", pod_key, context))
            held = self._pods.get(pod_key, {})
            victims = [h for h, (ctx, _) in held.items() if context is None or ctx == context]
            return sum(self._drop(pod_key, h) for h in victims)

    def remove_pod(self, pod_key: str) -> int:
        with self._lock:
            self.calls.append(("remove", pod_key))
            n = sum(self._drop(pod_key, h) for h in list(self._pods.get(pod_key, {})))
            self._pods.pop(pod_key, None)
            return n

    def match_prefix(self, context: ContextKey, token_ids: Sequence[int],
                     ready_pods: Iterable[str] | None = None) -> dict[str, PodMatch]:  # fmt: skip
        with self._lock:
            allowed = None if ready_pods is None else set(ready_pods)
            table = self._ctx.get(context, {})
            blocks = token_block_bytes(list(token_ids), self._block_size(context))
            total = len(blocks)
            matched: dict[str, int] = {}
            alive: set[str] | None = None
            parent = SEED
            for i, block in enumerate(blocks):
                parent = prefix_hash(parent, block)
                holders = {p for p in table.get(parent, {}) if allowed is None or p in allowed}
                alive = holders if alive is None else alive & holders
                if not alive:
                    break
                for p in alive:
                    matched[p] = i + 1
            return {p: PodMatch(n, 100.0 * n / total) for p, n in matched.items()}

    def _block_size(self, context: ContextKey) -> int:
        return self.block_size

    block_size = 4

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {"pods": sum(1 for h in self._pods.values() if h),
                    "blocks": sum(len(h) for h in self._pods.values())}  # fmt: skip

    def close(self) -> None:
        self.closed = True

    # --- for tests ---------------------------------------------------------------------

    def pod_blocks(self, pod_key: str) -> set[tuple[ContextKey, int]]:
        with self._lock:
            return {(ctx, h) for h, (ctx, _) in self._pods.get(pod_key, {}).items()}

    def pods_with_blocks(self) -> set[str]:
        with self._lock:
            return {p for p, held in self._pods.items() if held}
