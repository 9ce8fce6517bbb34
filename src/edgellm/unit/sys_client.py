"""Moved: the sys RPC client is :mod:`edgellm.comm.sys_client` (units, discovery and the
gateway share it). This name stays importable for code written against it."""

from edgellm.comm.sys_client import Registration, SysClient, SysError, SysUnavailable

__all__ = ["Registration", "SysClient", "SysError", "SysUnavailable"]
