"""Numbers the unit manager hands out: work ids, unit url ports, connection ids.

- work ids: ``<unit>.<n>``, ``n`` from one counter shared by all units (as upstream)
  starting at ``config_work_id``, never reused while the manager runs;
- ports: the pool ``[min_port, max_port)``, lowest free first, two per task (output url,
  inference url), freed on release;
- connection ids: one per TCP session from 8000, wrapping to 8000 after 65535 and skipping
  ids still in use.

Pure bookkeeping, owned by the manager's event loop thread.
"""

from __future__ import annotations

import heapq

FIRST_CONNECTION_ID = 8000
LAST_CONNECTION_ID = 65535


class PoolExhausted(RuntimeError):
    """No number left to hand out."""


class WorkIdCounter:
    """``next()`` -> the next work id number (any unit)."""

    def __init__(self, first: int = 0):
        self._next = first

    def next(self) -> int:
        n = self._next
        self._next = n + 1
        return n


class PortPool:
    """Ports ``[low, high)``; :meth:`take` gives the lowest free one."""

    def __init__(self, low: int, high: int):
        if not low < high:
            raise ValueError(f"empty port pool {low}..{high}")
        self.low, self.high = low, high
        self._free = list(range(low, high))  # already a heap
        self._taken: set[int] = set()

    def take(self) -> int:
        if not self._free:
            raise PoolExhausted(f"all {self.high - self.low} ports of {self.low}..{self.high} in use")
        port = heapq.heappop(self._free)
        self._taken.add(port)
        return port

    def take_specific(self, port: int) -> bool:
        """Take ``port`` itself if it is in the pool and free."""
        if port in self._taken or not self.low <= port < self.high:
            return False
        self._free.remove(port)
        heapq.heapify(self._free)
        self._taken.add(port)
        return True

    def give_back(self, port: int) -> None:
        if port in self._taken:
            self._taken.remove(port)
            heapq.heappush(self._free, port)

    @property
    def available(self) -> int:
        return len(self._free)


class ConnectionIds:
    """Session ids 8000..65535, wrapping, never one still in use."""

    def __init__(self, first: int = FIRST_CONNECTION_ID, last: int = LAST_CONNECTION_ID):
        self.first, self.last = first, last
        self._next = first
        self._in_use: set[int] = set()

    def take(self) -> int:
        span = self.last - self.first + 1
        for _ in range(span):
            cid = self._next
            self._next = self.first if cid >= self.last else cid + 1
            if cid not in self._in_use:
                self._in_use.add(cid)
                return cid
        raise PoolExhausted(f"all {span} connection ids in use")

    def give_back(self, cid: int) -> None:
        self._in_use.discard(cid)

    def __len__(self) -> int:
        return len(self._in_use)
