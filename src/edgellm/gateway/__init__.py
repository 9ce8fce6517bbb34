"""The OpenAI-compatible gateway (``edgellm serve``): an OpenAI API in front of llm units
(through unit managers' TCP front doors) and OpenAI-compatible HTTP engines, routing each
request to the engine that already caches most of its prompt.

Modules, from the wire in: :mod:`~edgellm.gateway.app` (HTTP endpoints),
:mod:`~edgellm.gateway.schemas` (request bodies), :mod:`~edgellm.gateway.responses`
(response objects, SSE), :mod:`~edgellm.gateway.service` (the request path: tokens,
admission, routing, retries, drain), :mod:`~edgellm.gateway.routing` (strategies),
:mod:`~edgellm.gateway.pool` (backends: health, load, KV event endpoints),
:mod:`~edgellm.gateway.stackflow` / :mod:`~edgellm.gateway.tasks` /
:mod:`~edgellm.gateway.frontdoor` (llm units), :mod:`~edgellm.gateway.openai_http` (HTTP
engines), :mod:`~edgellm.gateway.tokens` (prompt ids), :mod:`~edgellm.gateway.metrics`,
:mod:`~edgellm.gateway.runtime` (wiring), :mod:`~edgellm.gateway.commands` (the CLI).
"""
