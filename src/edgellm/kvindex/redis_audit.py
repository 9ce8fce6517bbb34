"""Reading a Redis index back, for audits, tests and benches (slow: reads every row).

:func:`dump` returns what each pod holds, per shard, decoded from the layout of
``redis_lua.py``; :func:`orphan_rows` counts rows whose parent their pod does not hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgellm.kvindex.redis_index import RedisPrefixIndex

__all__ = ["dump", "orphan_rows"]


def _rows(client, shard: str, slot: str) -> dict[int, tuple[int, int | None]]:
    rows = {}
    for engine, row in client.hgetall(f"{shard}:e:{slot}").items():
        parent = int.from_bytes(row[9:17], "big") if row[8:9] == b"P" else None
        rows[int.from_bytes(engine, "big")] = (int.from_bytes(row[:8], "big"), parent)
    return rows


def dump(index: "RedisPrefixIndex") -> dict[str, dict[str, dict[int, tuple[int, int | None]]]]:
    """``{shard: {pod: {engine hash: (prefix hash, parent engine hash or None)}}}``."""
    client = index._redis
    out = {}
    for shard in index._all_shards():
        pods = {k.decode(): v.decode() for k, v in client.hgetall(f"{shard}:s").items()}
        out[shard] = {pod: _rows(client, shard, slot) for pod, slot in pods.items()}
    return out


def orphan_rows(index: "RedisPrefixIndex") -> int:
    return sum(1 for pods in dump(index).values() for rows in pods.values()
               for _, parent in rows.values() if parent is not None and parent not in rows)
