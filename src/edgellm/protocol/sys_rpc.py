"""The ``sys`` RPC service of the unit manager (spec 1 §3.2): request data and replies.

=============  ================================  ==========================================
action         data                              reply
=============  ================================  ==========================================
register_unit  unit name (``llm``)               ``set_param(str(n), set_param(output_url,
                                                 inference_url))``; ``False`` if refused
release_unit   work id (``llm.3``)               ``Success`` (also for an unknown work id)
sql_select     key                               the value, ``""`` if none
sql_set        ``{"key": .., "val": ..}``        ``Success``; ``False`` if the key is empty
                                                 or the data is not such an object
sql_unset      key                               ``Success``
=============  ================================  ==========================================

Byte-faithful to the C++ ``StackFlow::sys_*`` helpers and ``llm_sys`` handlers, so both
sides of this module (``edgellm.manager.sys_service`` serving, ``edgellm.comm.sys_client``
calling) talk to their C++ counterparts. The unit manager may serve more actions than
these (they go through the same client); this module holds the wire of the ones above.
Data in, data out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from edgellm.protocol.params import ParamError, set_param, split_params

SYS_SERVICE = "sys"
SUCCESS = b"Success"
FALSE = b"False"

REGISTER_UNIT = "register_unit"
RELEASE_UNIT = "release_unit"
SQL_SELECT = "sql_select"
SQL_SET = "sql_set"
SQL_UNSET = "sql_unset"


class SysReplyError(ValueError):
    """A sys reply this side cannot read."""


@dataclass(frozen=True)
class Registration:
    """What ``register_unit`` hands out: ``work_id`` = ``<unit>.<number>``."""

    unit: str
    number: int
    output_url: str
    inference_url: str

    @property
    def work_id(self) -> str:
        return f"{self.unit}.{self.number}"


def encode_registration(number: int, output_url: str, inference_url: str) -> bytes:
    """The reply to ``register_unit``."""
    return set_param(str(number), set_param(output_url, inference_url))


def decode_registration(unit: str, reply: bytes) -> Registration:
    """The :class:`Registration` in a ``register_unit`` reply; :class:`SysReplyError` if
    the reply is not one (``False``: the manager refused)."""
    try:
        number_raw, urls = split_params(reply)
        output_url, inference_url = split_params(urls)
        number = int(number_raw.decode("ascii"))
        return Registration(unit, number, output_url.decode("utf-8"),
                            inference_url.decode("utf-8"))  # fmt: skip
    except (ParamError, ValueError, UnicodeDecodeError) as exc:
        raise SysReplyError(f"malformed register_unit reply {reply[:80]!r}") from exc


def encode_sql_set(key: str, val: str) -> bytes:
    """The data of ``sql_set``."""
    return json.dumps({"key": key, "val": val}, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")  # fmt: skip


def decode_sql_set(data: bytes) -> tuple[str, str] | None:
    """``(key, val)`` of ``sql_set`` data; ``None`` where upstream answers ``False`` (not a
    JSON object, or an empty or missing key). A value that is not a string is kept as its
    JSON text, which is what upstream stores."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    key = body.get("key")
    val = body.get("val", "")
    if not isinstance(key, str) or not key:
        return None
    if not isinstance(val, str):
        val = json.dumps(val, ensure_ascii=False, separators=(",", ":"))
    return key, val


def text(data: bytes) -> str:
    """A key, unit name or work id as the service reads it (bad UTF-8 replaced)."""
    return data.decode("utf-8", errors="replace")
