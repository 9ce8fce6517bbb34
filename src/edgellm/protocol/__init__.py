"""Wire formats, data in and data out: no sockets, threads, clocks or module state.

- ``envelope``, ``errors``: the JSON reply envelope and the error codes;
- ``framing``: JSON objects out of a TCP byte stream;
- ``params``: ``set_param`` / ``get_param`` packing;
- ``rpc``: the RPC frames (``NotAction``, ``list_action``, a handler's error report);
- ``sys_rpc``: the unit manager's ``sys`` actions;
- ``kv_events`` (+ ``kv_event_types``, ``kv_event_fallback``): vLLM's KV event batches.
"""
