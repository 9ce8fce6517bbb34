"""Reassembly of streamed input (spec 1 §4): ``data = {"delta", "index", "finish"}``.

Pieces are buffered by ``index``; when a piece with ``finish`` true arrives the deltas of
indices ``0..n-1`` are joined in order. As upstream (``decode_stream``): a missing
``finish`` counts as finished, a repeated index overwrites, and a gap or an unreadable
index is an error (-25), after which the buffer starts afresh. Unlike upstream the buffer
is bounded, so a sender cannot grow a unit's memory without limit.
"""

from __future__ import annotations

from typing import Any

MAX_PIECES = 65536
MAX_CHARS = 16 * 1024 * 1024


class StreamIndexError(ValueError):
    """A streamed piece cannot be placed (error -25, "stream data index error")."""


class StreamAssembler:
    """Buffers the pieces of one input stream. Not thread-safe: one per task and source."""

    __slots__ = ("_pieces", "_chars")

    def __init__(self) -> None:
        self._pieces: dict[int, str] = {}
        self._chars = 0

    def __len__(self) -> int:
        return len(self._pieces)

    def reset(self) -> None:
        self._pieces.clear()
        self._chars = 0

    def feed(self, data: Any) -> str | None:
        """Add one piece; the joined text once the stream finishes, else ``None``.

        Raises :class:`StreamIndexError` (and resets) for a piece that is not an object, an
        index that is not a non-negative integer, a non-string delta, a non-boolean finish,
        a gap at finish time, or a stream over the size bounds.
        """
        try:
            return self._feed(data)
        except StreamIndexError:
            self.reset()
            raise

    def _feed(self, data: Any) -> str | None:
        if not isinstance(data, dict):
            raise StreamIndexError("streamed data must be an object with delta/index/finish")
        index = data.get("index")
        if type(index) is not int or index < 0:
            raise StreamIndexError(f"index must be a non-negative integer, got {index!r}")
        delta = data.get("delta", "")
        if not isinstance(delta, str):
            raise StreamIndexError("delta must be a string")
        finish = data.get("finish", True)
        if not isinstance(finish, bool):
            raise StreamIndexError("finish must be a boolean")
        previous = self._pieces.get(index)
        self._chars += len(delta) - (len(previous) if previous is not None else 0)
        self._pieces[index] = delta
        if len(self._pieces) > MAX_PIECES or self._chars > MAX_CHARS:
            raise StreamIndexError("streamed input too large")
        if not finish:
            return None
        pieces = self._pieces
        count = len(pieces)
        if count == 1 and 0 in pieces:  # the common case: one piece, finish true
            text = pieces[0]
        else:
            try:
                text = "".join([pieces[i] for i in range(count)])
            except KeyError as exc:
                raise StreamIndexError(f"stream has a gap at index {exc.args[0]}") from None
        self.reset()
        return text
