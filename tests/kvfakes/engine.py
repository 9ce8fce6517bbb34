"""A simulated inference engine: the ground truth of what one pod's prefix cache holds.

It produces the KV events a vLLM engine would (BlockStored chains with parents,
BlockRemoved of its own blocks, AllBlocksCleared) and remembers, per block, which
published batch stored it, so a test can say what the index must hold - all of it, or
only what a publisher can still replay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from edgellm.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored


@dataclass
class HeldBlock:
    engine_hash: int
    parent: int | None
    context: tuple[str, int]
    tokens: tuple[int, ...]
    stored_by_seq: int | None = None


class SimEngine:
    def __init__(self, model: str, *, block_size: int = 4, seed: int = 0, lora_id: int = -1):
        self.model = model
        self.lora_id = lora_id
        self.block_size = block_size
        self.rng = random.Random(seed)
        self.held: dict[int, HeldBlock] = {}
        self._pending_seq: list[HeldBlock] = []

    def _new_hash(self) -> int:
        while True:
            h = self.rng.getrandbits(64)
            if h not in self.held:
                return h

    def store_chain(self, n_blocks: int, *, parent: int | None = None,
                    lora_id: int | None = None, tokens: list[int] | None = None) -> BlockStored:  # fmt: skip
        """A new chain of ``n_blocks`` (random tokens unless given) after ``parent``."""
        bs = self.block_size
        if tokens is None:
            tokens = [self.rng.randrange(50_000) for _ in range(n_blocks * bs)]
        ctx = (self.model, self.lora_id if lora_id is None else lora_id)
        hashes = []
        prev = parent
        for i in range(n_blocks):
            h = self._new_hash()
            block = HeldBlock(h, prev, ctx, tuple(tokens[i * bs : (i + 1) * bs]))
            self.held[h] = block
            self._pending_seq.append(block)
            hashes.append(h)
            prev = h
        return BlockStored(hashes, parent, tokens, bs, lora_id, "GPU", None)

    def extend(self, n_blocks: int) -> BlockStored:
        """Continue an existing chain (its last block as parent), as decoding does."""
        parent = self.rng.choice(sorted(self.held)) if self.held else None
        lora = self.held[parent].context[1] if parent is not None else None
        return self.store_chain(n_blocks, parent=parent,
                                lora_id=None if lora == self.lora_id else lora)  # fmt: skip

    def evict(self, n: int) -> BlockRemoved:
        """Evict up to ``n`` leaf-first blocks (vLLM evicts leaves)."""
        parents = {b.parent for b in self.held.values()}
        leaves = sorted(h for h in self.held if h not in parents)
        victims = leaves[:n]
        for h in victims:
            del self.held[h]
        return BlockRemoved(victims, "GPU")

    def clear(self) -> AllBlocksCleared:
        self.held.clear()
        return AllBlocksCleared()

    def random_events(self, n: int) -> list:
        events = []
        for _ in range(n):
            r = self.rng.random()
            if r < 0.45 or not self.held:
                events.append(self.store_chain(self.rng.randint(1, 4)))
            elif r < 0.75:
                events.append(self.extend(self.rng.randint(1, 3)))
            else:
                events.append(self.evict(self.rng.randint(1, 3)))
        return events

    def published(self, seq: int) -> None:
        """The events made since the last call went out as batch ``seq``."""
        for block in self._pending_seq:
            block.stored_by_seq = seq
        self._pending_seq.clear()

    # --- ground truth ----------------------------------------------------------------

    def truth(self) -> set[tuple[tuple[str, int], int]]:
        return {(b.context, h) for h, b in self.held.items()}

    def replayable_truth(self, first_buffered_seq: int) -> set[tuple[tuple[str, int], int]]:
        """Held blocks whose whole chain was stored by batches still in the buffer."""
        ok: dict[int, bool] = {}

        def known(h: int) -> bool:
            if h in ok:
                return ok[h]
            b = self.held[h]
            good = b.stored_by_seq is not None and b.stored_by_seq >= first_buffered_seq and (
                b.parent is None or (b.parent in self.held and known(b.parent)))  # fmt: skip
            ok[h] = good
            return good

        return {(b.context, h) for h, b in self.held.items() if known(h)}
