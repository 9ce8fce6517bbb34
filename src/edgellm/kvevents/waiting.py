"""What a pod's stream waits for: the replay request outstanding (:class:`Replay`) and the
live batches kept until a replay decides on them (pure data).

A :class:`WaitingRoom` holds two kinds of :class:`Live` batches, bounded together by
``capacity``:

- *held*: at most one per seq, at or beyond the stream's next seq (beyond a gap, or
  arrived while a replay was outstanding);
- *suspects*: any number per seq: behind the stream and no copy of a submitted batch, or
  a second batch for a held seq.

Each batch remembers how many replay requests had been sent when it arrived (``epoch``):
an answer to request ``n`` decides on the batches with ``epoch < n`` (the publisher had
published them before it served the request).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(slots=True)
class Live:
    """A live batch waiting for a replay's verdict."""

    payload: bytes
    epoch: int  # replay requests sent before it arrived
    gap: int = 0  # live seqs skipped just before it: missed, if it proves genuine


class WaitingRoom:
    """Held batches and suspects of one stream (see the module docstring)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held: dict[int, Live] = {}
        self._suspects: dict[int, list[Live]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def has_room(self) -> bool:
        return self._count < self.capacity

    @property
    def has_suspects(self) -> bool:
        return bool(self._suspects)

    def suspect_seqs(self) -> Iterator[int]:
        return iter(self._suspects)

    def hold(self, seq: int, live: Live) -> None:
        assert seq not in self.held
        self.held[seq] = live
        self._count += 1

    def unhold(self, seq: int) -> Live:
        self._count -= 1
        return self.held.pop(seq)

    def suspect(self, seq: int, live: Live) -> None:
        self._suspects.setdefault(seq, []).append(live)
        self._count += 1

    def take_suspects(self, seq: int, before: int) -> list[Live]:
        """Remove and return the suspects of ``seq`` that arrived before request ``before``."""
        lives = self._suspects.get(seq)
        if not lives:
            return []
        taken = [live for live in lives if live.epoch < before]
        kept = [live for live in lives if live.epoch >= before]
        self._count -= len(taken)
        if kept:
            self._suspects[seq] = kept
        else:
            del self._suspects[seq]
        return taken

    def take_all_suspects(self, before: int) -> list[tuple[int, Live]]:
        """Remove and return every suspect that arrived before request ``before``."""
        return [(seq, live) for seq in list(self._suspects)
                for live in self.take_suspects(seq, before)]  # fmt: skip

    def empty(self) -> list[tuple[int, Live]]:
        """Remove everything; held batches in seq order, then suspects in seq order."""
        out = sorted(self.held.items(), key=lambda item: item[0])
        out += sorted(((s, live) for s, lives in self._suspects.items() for live in lives),
                      key=lambda item: item[0])  # fmt: skip
        self.held.clear()
        self._suspects.clear()
        self._count = 0
        return out


@dataclass
class Replay:
    """The replay request outstanding."""

    number: int  # requests sent before it, itself included
    start: int
    check_to: int  # answer items up to here must equal what was submitted (-1: none)
    purpose: str  # start | resync | gap | verify | overflow | probe | reconnect | recover | resume
    clear_first: str | None = None  # a rebuild whose clear (this reason) waits for the answer
    verifies: bool = False  # sent after the suspects it judges: never abandoned for them
    first: bool = True
    restart: bool = False  # the answer differs from what was submitted: a new stream
    hole: bool = False  # the answer skipped seqs (publisher HWM) or our queue was full
    items: int = 0
    last: int | None = None  # last seq of the answer
