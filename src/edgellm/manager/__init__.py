"""The unit manager daemon (upstream ``llm_sys`` / ``unit-manager``), spec 1 §3.

The path of a client's request, top to bottom (one asyncio loop owns every socket)::

    TCP bytes
      -> Session: framing, backlog, flow control               session.py
      -> Dispatcher.handle                                      dispatch.py
           sys action     -> answered at once
           inference      -> UnitRegistry: the task's XPUB      units.py
           other actions  -> AsyncRpcClient -> rpc.<unit>       comm.rpc_asyncio
      ... the unit PUSHes its answers to the session's PULL
      <- PendingTable: one terminal answer per request, deadlines  pending.py
      <- Session writes them to the TCP stream

    a unit -> rpc.sys (AsyncRpcServer) -> SysService              sys_service.py
           -> UnitRegistry (work ids, inference urls), KeyValueStore, UnitLeases

``UnitManager`` (``server``) builds these parts and hands each what it uses (the config,
the loop, the registry, the store, a clock); none of them knows the manager. Modules:

- ``commands``: ``edgellm unit-manager`` and ``edgellm up``;
- ``config``: one frozen :class:`~edgellm.manager.config.ManagerConfig` from defaults,
  ``sys_config.json``, ``EDGELLM_*`` env vars and flags;
- ``server``, ``session``, ``dispatch``, ``pending``, ``units``, ``sys_service`` as drawn;
  ``store``, ``allocator`` and ``leases`` behind the sys service;
- ``sysinfo``: what ``hwinfo``, ``lsmode`` and ``lsunit`` report.
"""
