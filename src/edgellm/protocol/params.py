"""Two-parameter packing of the StackFlow comm layer (``pzmq_data::set_param/get_param``).

Wire form: one length byte holding ``len(p0)``, then ``p0``, then ``p1`` (the rest).
The C++ original stores the length in a ``char`` it later reads as signed, so a ``p0`` of
128 bytes or more corrupts on the C++ side; :func:`set_param` therefore refuses ``p0``
longer than :data:`MAX_P0` bytes with :class:`ParamError` rather than emitting a frame a C++
peer would misread.
"""

from __future__ import annotations

MAX_P0 = 127
"""Longest first parameter that a C++ peer decodes correctly (its length byte is signed)."""


class ParamError(ValueError):
    """A packed parameter pair cannot be built or is malformed."""


def _as_bytes(value: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def set_param(p0: bytes | str, p1: bytes | str) -> bytes:
    """Pack ``p0`` and ``p1`` into one frame, byte-exact with the C++ ``set_param``."""
    first = _as_bytes(p0)
    if len(first) > MAX_P0:
        raise ParamError(
            f"first parameter is {len(first)} bytes; at most {MAX_P0} fit a C++ peer's length byte"
        )
    return bytes((len(first),)) + first + _as_bytes(p1)


def get_param(data: bytes, index: int) -> bytes:
    """Undo :func:`set_param`: ``index`` 0 gives ``p0``, 1 gives ``p1``.

    Like the C++ original, an even index means the first parameter and an odd one the
    second. Raises :class:`ParamError` for an empty frame or a length byte pointing past
    its end (the C++ original would read out of bounds there).
    """
    if not data:
        raise ParamError("empty parameter frame")
    size = data[0]
    if size > MAX_P0 or 1 + size > len(data):
        raise ParamError(f"parameter length byte {size} does not fit a {len(data)}-byte frame")
    if index % 2 == 0:
        return bytes(data[1 : 1 + size])
    return bytes(data[1 + size :])


def split_params(data: bytes) -> tuple[bytes, bytes]:
    """Both parameters at once: ``(get_param(data, 0), get_param(data, 1))``."""
    return get_param(data, 0), get_param(data, 1)
