"""The OpenAPI documents of the gateway and of kv-events describe the bodies their handlers
parse themselves, with every reference resolvable (what schema-driven testers read)."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry

from edgellm.discovery.provider import StaticPodProvider
from edgellm.gateway.config import GatewayConfig
from edgellm.gateway.runtime import GatewayRuntime
from edgellm.kvevents.config import ManagerConfig
from edgellm.kvevents.http import build_app as kv_events_app
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvindex.memory import MemoryPrefixIndex


def _resolvable(spec: dict) -> None:
    for ref in set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(spec))):
        node = spec
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]  # KeyError: a reference to nowhere


def test_the_gateways_document():
    runtime = GatewayRuntime(GatewayConfig())
    spec = runtime.api.openapi()
    _resolvable(spec)
    assert set(spec["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                  "/tokenize", "/detokenize", "/health", "/metrics"}
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    schema = chat["application/json"]["schema"]
    assert {"model", "messages"} <= set(schema["required"]) and "max_tokens" in schema["properties"]
    assert set(spec["paths"]["/health"]) == {"get"}  # HEAD answered, not listed twice


def test_the_kv_events_document():
    index = MemoryPrefixIndex()
    manager = KVEventManager(StaticPodProvider(), index, config=ManagerConfig(enabled=True))
    spec = kv_events_app(manager, index, CollectorRegistry()).openapi()
    _resolvable(spec)
    assert set(spec["paths"]) == {"/v1/score", "/metrics", "/health"}
    index.close()
