"""The frames of the StackFlow RPC (C++ ``pzmq`` RPC_FUN / RPC_CALL, i.e. REP / REQ).

- request: two frames ``[action, data]``; reply: one frame;
- an unknown action (or a request that is not two frames) is answered :data:`NOT_ACTION`
  (upstream StackFlow: ``"<action> NotAction"``, so clients test the end of the reply);
- every service answers :data:`LIST_ACTION` with ``{"actions":["a","b",...]}``;
- a handler that crashed is answered with an *error report*: :data:`ERROR_MARK` (a byte
  that UTF-8 text never holds, so no reply of a C++ node, of the sys service or of a unit
  can be taken for one), then ``"<action>: <what failed>"`` in UTF-8. Handlers' own
  replies must therefore not begin with that byte.

Data in, data out: no sockets here (``edgellm.comm.rpc`` moves these frames).
"""

from __future__ import annotations

import json

NOT_ACTION = b"NotAction"
LIST_ACTION = "list_action"
ERROR_MARK = b"\xff"


class RpcRequestError(ValueError):
    """Frames that are not an RPC request (answered :data:`NOT_ACTION`)."""


def parse_request(frames: list[bytes]) -> tuple[str, bytes]:
    """``[action, data]`` -> ``(action, data)``; raises :class:`RpcRequestError`."""
    if len(frames) != 2:
        raise RpcRequestError(f"a request is 2 frames, not {len(frames)}")
    try:
        return frames[0].decode("utf-8"), frames[1]
    except UnicodeDecodeError:
        raise RpcRequestError("the action is not UTF-8") from None


def request_frames(action: str, data: bytes | str) -> list[bytes]:
    """The two frames of a call."""
    return [action.encode("utf-8"), data.encode("utf-8") if isinstance(data, str) else data]


def encode_actions(actions: list[str]) -> bytes:
    """The reply to :data:`LIST_ACTION`."""
    return json.dumps({"actions": actions}, separators=(",", ":")).encode()


def decode_actions(reply: bytes) -> list[str]:
    """The actions of a :data:`LIST_ACTION` reply; raises ``ValueError`` if it is not one."""
    try:
        actions = json.loads(reply)["actions"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a list_action reply: {reply[:80]!r}") from exc
    if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
        raise ValueError(f"not a list_action reply: {reply[:80]!r}")
    return actions


def encode_error(action: str, problem: str) -> bytes:
    """The error report of a handler that failed on ``action``."""
    return ERROR_MARK + f"{action}: {problem}".encode("utf-8", errors="replace")


def error_text(reply: bytes) -> str | None:
    """What an error report says; ``None`` for any other reply."""
    if reply[:1] != ERROR_MARK:
        return None
    return reply[1:].decode("utf-8", errors="replace")


def is_not_action(reply: bytes) -> bool:
    """The service has no such action (``NotAction``, or upstream's ``<action> NotAction``)."""
    return reply.endswith(NOT_ACTION)
