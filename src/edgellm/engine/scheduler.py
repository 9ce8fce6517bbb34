"""Who runs in the next engine step (vLLM v1 / nano-vllm's scheduler role).

Each step computes, in one forward pass:

1. one token for every running request that is decoding;
2. at most ``prefill_chunk`` prompt tokens in all, for requests still prefilling (running
   first, then newly admitted ones, in arrival order) — so a long prompt delays the
   running streams by at most one chunk per step.

Admission (waiting -> running) reuses the longest cached block prefix of the request's
tokens (never the whole sequence: at least one token is computed, its logits are needed)
and reserves every block the request's current tokens need at once, so a prefill never
stalls half-way; a request that does not fit waits, first in line. When a running request
needs a new block for its next token and none is free, the most recently admitted request is
preempted (its blocks go back; it waits at the front and is recomputed later, mostly from the
prefix cache). A request alone in the engine that cannot grow any more ends with
``"length"``: never a crash, never a deadlock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from edgellm.engine.block_pool import BlockPool
from edgellm.engine.request import Request, Status


@dataclass
class ScheduledBatch:
    """The requests of one step and how many of their tokens each computes."""

    requests: list[Request] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    """Requests the scheduler ended this step (no room to grow): report them."""

    def __bool__(self) -> bool:
        return bool(self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    """Waiting and running requests over one :class:`BlockPool` (engine thread only)."""

    def __init__(self, pool: BlockPool, *, prefill_chunk: int, max_num_seqs: int):
        self.pool = pool
        self.block_size = pool.block_size
        self.prefill_chunk = prefill_chunk
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.prefill_chunk
        preempted = False
        for request in list(self.running):
            if request.status is not Status.RUNNING:
                continue  # preempted by an earlier request of this loop
            if request.prefilling:
                n = min(request.num_tokens - request.num_computed, budget)
                if n <= 0:
                    continue
            else:
                n = 1
            if not self._grow(request, request.num_computed + n, batch):
                preempted = True
                continue
            if request.prefilling:
                budget -= n
            batch.requests.append(request)
            batch.num_new.append(n)
        # A request preempted above may still sit in the batch if it was scheduled before
        # the one that needed its blocks: drop it.
        if preempted:
            keep = [(r, n) for r, n in zip(batch.requests, batch.num_new) if r.status is Status.RUNNING]
            batch.requests = [r for r, _ in keep]
            batch.num_new = [n for _, n in keep]
        while self.waiting and budget > 0 and not preempted \
                and len(self.running) < self.max_num_seqs:  # fmt: skip
            request = self.waiting[0]
            if not self._admit(request):
                break
            self.waiting.popleft()
            self.running.append(request)
            n = min(request.num_tokens - request.num_computed, budget)
            budget -= n
            batch.requests.append(request)
            batch.num_new.append(n)
        return batch

    def _grow(self, request: Request, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Blocks for ``num_tokens`` of ``request``, preempting others if needed. False if
        ``request`` itself was preempted or finished for lack of room."""
        need = self.blocks_for(num_tokens) - len(request.blocks)
        while need > self.pool.num_free:
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                self.running.pop()
                self._release(request)
                request.finish("length")
                batch.finished.append(request)
                return False
            self.preempt(victim)
            if victim is request:
                return False
        if need > 0:
            last = request.blocks[-1].block_id if request.blocks else None
            request.blocks.extend(self.pool.allocate(need, near=last))
        return True

    def _admit(self, request: Request) -> bool:
        """Take the cached prefix and reserve the blocks of ``request``'s tokens; False (and
        nothing changed) if they do not fit now."""
        bs = self.block_size
        usable = (request.num_tokens - 1) // bs  # never the whole sequence: one token to compute
        hits = self.pool.lookup(request.block_hashes[:usable])
        free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        need = self.blocks_for(request.num_tokens) - len(hits)
        if need > self.pool.num_free - free_hits:
            return False
        self.pool.touch(hits)
        request.blocks = list(hits) + self.pool.allocate(need, near=hits[-1].block_id if hits else None)
        request.num_cached_blocks = len(hits)
        request.num_computed = len(hits) * bs
        if request.cached_tokens is None:  # first admission: what the client is told
            request.cached_tokens = request.num_computed
            self.pool.count_query(request.num_tokens, request.num_computed)
        request.status = Status.RUNNING
        return True

    # -- ends --------------------------------------------------------------------------------

    def preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.preemptions += 1

    def _release(self, request: Request) -> None:
        self.pool.free(request.blocks)
        request.blocks = []
        request.num_computed = 0
        request.num_cached_blocks = 0

    def finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """End ``request`` wherever it is; its blocks go back to the pool."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        if request.blocks:
            self._release(request)
        request.finish(reason, error)
