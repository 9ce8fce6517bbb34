"""The JSON envelope every unit-manager and unit reply carries (spec 1 §3.3, §6).

A reply is one JSON object followed by ``\\n``::

    {"created": 1732260000, "data": ..., "error": {"code": 0, "message": ""},
     "object": "llm.utf-8.stream", "request_id": "llm_001", "work_id": "llm.0"}

Keys come out sorted, compact, UTF-8 unescaped: byte-for-byte what the C++ original's
``nlohmann::json::dump()`` produces for the same values, so clients that compare text keep
working. ``created`` is unix seconds (an integer), which the caller reads from its clock:
pure functions, no clock here.
"""

from __future__ import annotations

import json
from typing import Any

from edgellm.protocol.errors import ErrorCode

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)

SYS_WORK_ID = "sys"
"""``work_id`` of the unit manager itself; an empty ``work_id`` means the same."""

NO_REQUEST_ID = "0"
"""``request_id`` used when the request could not be read (upstream's choice)."""


def make_response(
    request_id: str,
    work_id: str,
    object_: str,
    data: Any,
    code: int = 0,
    message: str = "",
    *,
    created: int,
) -> dict[str, Any]:
    """The envelope as a dict (keys as the wire has them)."""
    return {
        "created": created,
        "data": data,
        "error": {"code": int(code), "message": message},
        "object": object_,
        "request_id": request_id,
        "work_id": work_id,
    }


def encode(envelope: dict[str, Any]) -> bytes:
    """One envelope as wire bytes: compact sorted JSON plus the terminating ``\\n``."""
    return (_encoder.encode(envelope) + "\n").encode("utf-8")


def encode_response(
    request_id: str,
    work_id: str,
    object_: str,
    data: Any,
    code: int = 0,
    message: str = "",
    *,
    created: int,
) -> bytes:
    """:func:`make_response` then :func:`encode`."""
    return encode(make_response(request_id, work_id, object_, data, code, message,
                                created=created))  # fmt: skip


def encode_error(
    code: ErrorCode,
    request_id: str = NO_REQUEST_ID,
    work_id: str = SYS_WORK_ID,
    message: str | None = None,
    object_: str = "None",
    *,
    created: int,
) -> bytes:
    """An error reply; ``message`` defaults to the code's standard text."""
    return encode_response(
        request_id,
        work_id,
        object_,
        "None",
        int(code),
        code.message if message is None else message,
        created=created,
    )
