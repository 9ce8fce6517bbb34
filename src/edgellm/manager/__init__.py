"""The unit manager daemon (upstream ``llm_sys`` / ``unit-manager``), spec 1 §3.

Modules, from the outside in:

- ``commands``: ``edgellm unit-manager`` and ``edgellm up`` (manager + echo unit);
- ``config``: one frozen :class:`~edgellm.manager.config.ManagerConfig` from defaults,
  ``sys_config.json``, ``EDGELLM_*`` env vars and flags;
- ``server``: :class:`~edgellm.manager.server.UnitManager`, every socket on one asyncio loop;
- ``session``: one TCP client (framing in, unit answers out, a PULL per session);
- ``dispatch``: routing of one request (inference publish, unit RPC, ``sys`` actions);
- ``pending``: deadline tracking, one terminal answer per request;
- ``units``: registered tasks and their inference XPUB sockets;
- ``sys_service``: the ``sys`` RPC actions units call; ``store`` and ``allocator`` behind it;
- ``sysinfo``: what ``hwinfo``, ``lsmode`` and ``lsunit`` report.
"""
