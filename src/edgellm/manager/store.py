"""The unit manager's key/value store (upstream ``key_sql``), behind ``sql_*`` RPC actions.

Keys and values are strings. Units use it to find each other's output urls
(``<work_id>.out_port``) when chaining. Owned by the manager's event loop thread: no lock.
"""

from __future__ import annotations

from typing import Iterator


class KeyValueStore:
    """String keys to string values; missing keys read as ``""`` (upstream's answer)."""

    def __init__(self, initial: dict[str, str] | None = None):
        self._data: dict[str, str] = dict(initial or {})

    def select(self, key: str) -> str:
        return self._data.get(key, "")

    def set(self, key: str, value: str) -> None:
        if not key:
            raise ValueError("empty key")
        self._data[key] = value

    def unset(self, key: str) -> None:
        self._data.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)
