"""Reading a unit's action requests (the JSON text after ``set_param``'s client url)."""

from __future__ import annotations

import json
from typing import Any


def text_of(value: Any) -> str:
    """A JSON value as upstream's ``sample_json_str_get`` would give it (strings bare)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def parse_request(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """The request object and its request_id (``"0"`` when unreadable, as upstream)."""
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError):
        return None, "0"
    if not isinstance(msg, dict):
        return None, "0"
    return msg, text_of(msg.get("request_id"))


__all__ = ["parse_request", "text_of"]
