"""Errors of the comm layer, one tree::

    CommError
     ├── EndpointError     a url could not be bound or connected, or a socket failed
     │                     (also an OSError: callers that handle OSError handle it)
     ├── RpcUnavailable    nothing is bound at the service's ipc path (not running)
     ├── RpcTimeout        no reply within the deadline
     ├── RpcRemoteError    the service's handler crashed on the action (its report)
     └── SysError          a sys RPC reply this side cannot use (``sys_client``)
          └── SysUnavailable   the sys service did not answer before the deadline

``RpcUnavailable`` and ``RpcTimeout`` are *retriable* (the service may come back);
``RpcRemoteError`` and ``EndpointError`` are not.
"""

from __future__ import annotations


class CommError(Exception):
    """A comm-layer operation failed."""

    retriable = False


class EndpointError(CommError, OSError):
    """A url could not be bound or connected, or a socket operation failed."""


class RpcUnavailable(CommError):
    """The service's ipc endpoint does not exist (the process is not running)."""

    retriable = True


class RpcTimeout(CommError):
    """The service did not answer within the deadline."""

    retriable = True


class RpcRemoteError(CommError):
    """The service answered with an error report: its handler failed on the action."""


class SysError(CommError):
    """The sys service answered something this client cannot use, or failed."""


class SysUnavailable(SysError):
    """The sys service did not answer before the call's deadline."""

    retriable = True
