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
alloc_port     ``<unit>`` or ``<unit>:<port>``   a port of the pool leased to the unit (the
                                                 lowest free, or that one), as decimal text;
                                                 ``False`` if none / taken
release_port   ``<unit>:<port>``                 ``Success``; ``False`` if not its lease
=============  ================================  ==========================================

The first five are byte-faithful to the C++ ``StackFlow::sys_*`` helpers and ``llm_sys``
handlers, so both sides of this module (``edgellm.manager.sys_service`` serving,
``edgellm.comm.sys_client`` calling) talk to their C++ counterparts; ``alloc_port`` and
``release_port`` are this project's (a C++ manager answers them ``NotAction``). Data in,
data out.
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
ALLOC_PORT = "alloc_port"
RELEASE_PORT = "release_port"

# Keys of the key/value store with a meaning beyond upstream's ``<work_id>.out_port``.
BOX_NAME_KEY = "sys.box_name"
"""The box's name (the manager's ``box_name``): pod keys are ``<box>/<unit>``."""
UNIT_KEY_PREFIX = "unit."
"""``unit.<unit>``: a running unit's registration, a JSON object (``pid``, ``rpc_url``,
``actions``), kept by the unit across manager restarts (``lsunit`` shows it)."""
MODE_KEY_PREFIX = "mode."
"""``mode.<unit>``: a JSON array of the unit's mode infos (``lsmode`` lists them)."""
KVEVENTS_KEY_PREFIX = "kvevents."
"""``kvevents.<id>``: a KV event endpoint (``<id>`` a work id, or a unit's name)."""
KVEVENTS_INDEX_KEY = "kvevents.index"
"""A JSON array of the ids that announce a KV event endpoint."""


def out_port_key(work_id: str) -> str:
    return f"{work_id}.out_port"


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
    if reply == FALSE:  # upstream's refusal: its reason is in the manager's log
        raise SysReplyError("the unit manager refused register_unit (no work id or port pair "
                            "left, or a bad unit name; its log says which)")  # fmt: skip
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


def encode_port_lease(unit: str, port: int | None = None) -> bytes:
    """The data of ``alloc_port`` (``port`` None: any free one) and ``release_port``."""
    return (unit if port is None else f"{unit}:{port}").encode("utf-8")


def decode_port_lease(data: bytes) -> tuple[str, int | None] | None:
    """``(unit, port or None)`` of ``alloc_port`` / ``release_port`` data; None if the
    port is not a number in 1..65535 (the unit name is the server's to check)."""
    unit, sep, port_text = text(data).partition(":")
    if not sep:
        return unit, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return unit, int(port_text)


def text(data: bytes) -> str:
    """A key, unit name or work id as the service reads it (bad UTF-8 replaced)."""
    return data.decode("utf-8", errors="replace")
