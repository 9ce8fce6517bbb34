"""The comm layer: the only package that imports ZeroMQ.

Layers, each on the ones below it::

    sys_client   the one client of the unit manager's sys service (units, discovery,
                 the gateway)
    rpc_thread   RpcServer on a socket thread, RpcClient, probe, wait_for_service
    rpc_asyncio  AsyncRpcServer, AsyncRpcClient on the caller's event loop
    rpc          the RPC core both adapters share: RpcDispatcher, the call around the wait
    outbox       PUSH endpoints to clients' urls, reused
    loop         SocketThread: a thread owning endpoints (readers, timers, a mailbox)
    aio          endpoints watched by an asyncio loop
    endpoints    the process's one context; Pub, XPub, Sub, Push, Pull, Router, Dealer, Req
    curve        CURVE keys of tcp endpoints between boxes, the process's ZAP authenticator
    urls, errors ipc addresses and files; the CommError tree

Wire formats live in :mod:`edgellm.protocol` (``rpc``, ``sys_rpc``), which this layer
moves; everything else moves messages through this one.
"""

from edgellm.comm.curve import CurveClient, CurveKeyError, CurveServer, create_keypair
from edgellm.comm.endpoints import (
    Dealer,
    Endpoint,
    LinkEvent,
    Pub,
    Pull,
    Push,
    Req,
    Router,
    Sub,
    XPub,
    context,
)
from edgellm.comm.errors import (
    CommError,
    EndpointError,
    RpcRemoteError,
    RpcTimeout,
    RpcUnavailable,
    SysError,
    SysUnavailable,
)
from edgellm.comm.loop import SocketThread
from edgellm.comm.outbox import Outbox
from edgellm.comm.rpc import RpcDispatcher
from edgellm.comm.rpc_asyncio import AsyncRpcClient, AsyncRpcServer
from edgellm.comm.rpc_thread import RpcClient, RpcServer, probe, wait_for_service
from edgellm.comm.sys_client import Registration, SysClient

__all__ = [
    "AsyncRpcClient",
    "AsyncRpcServer",
    "CommError",
    "CurveClient",
    "CurveKeyError",
    "CurveServer",
    "Dealer",
    "Endpoint",
    "EndpointError",
    "LinkEvent",
    "Outbox",
    "Pub",
    "Pull",
    "Push",
    "Registration",
    "Req",
    "Router",
    "RpcClient",
    "RpcDispatcher",
    "RpcRemoteError",
    "RpcServer",
    "RpcTimeout",
    "RpcUnavailable",
    "SocketThread",
    "Sub",
    "SysClient",
    "SysError",
    "SysUnavailable",
    "XPub",
    "context",
    "create_keypair",
    "probe",
    "wait_for_service",
]
