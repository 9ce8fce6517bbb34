"""The gateway's Prometheus series, on a registry that is passed in.

Counted as requests happen:

- ``edgellm_gateway_requests_total{endpoint, model, status}``: every answered request;
- ``edgellm_gateway_time_to_first_token_seconds{model}`` (histogram), and
  ``edgellm_gateway_request_duration_seconds{model}`` (histogram, to the last byte);
- ``edgellm_gateway_prompt_tokens_total{model}``, ``..._cached_prompt_tokens_total{model}``,
  ``..._generation_tokens_total{model}``;
- ``edgellm_gateway_routing_decisions_total{strategy, reason, backend}``;
- ``edgellm_gateway_retries_total{backend, reason}``: a backend failed before the first
  piece and the request went elsewhere;
- ``edgellm_gateway_rejected_total{reason}``: ``queue_full`` (429), ``no_backend`` (503),
  ``draining`` (503).

Read at scrape time from the backends (:meth:`GatewayMetrics.watch`):

- ``edgellm_gateway_backend_up{backend}`` and ``edgellm_gateway_backend_in_flight{backend}``;
- vLLM's gauges per backend and model, as the backend last reported them:
  ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``
  (labels ``backend``, ``model_name``) - what gateways in front of this one read.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgellm.gateway.backend import Backend

_LATENCY = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        p = "edgellm_gateway_"
        self.requests = Counter(p + "requests", "Answered requests",
                                ["endpoint", "model", "status"], registry=registry)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to the first generated text",
                              ["model"], buckets=_LATENCY, registry=registry)  # fmt: skip
        self.duration = Histogram(p + "request_duration_seconds", "Time to the last byte",
                                  ["model"], buckets=_LATENCY, registry=registry)  # fmt: skip
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens", ["model"],
                                     registry=registry)  # fmt: skip
        self.cached_tokens = Counter(p + "cached_prompt_tokens", "Prompt tokens served from "
                                     "the engine's prefix cache", ["model"], registry=registry)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", ["model"],
                                         registry=registry)  # fmt: skip
        self.decisions = Counter(p + "routing_decisions", "Backends chosen",
                                 ["strategy", "reason", "backend"], registry=registry)  # fmt: skip
        self.retries = Counter(p + "retries", "Requests sent elsewhere after a backend failed "
                               "before the first piece", ["backend", "reason"], registry=registry)
        self.rejected = Counter(p + "rejected", "Requests refused for want of capacity",
                                ["reason"], registry=registry)  # fmt: skip

    def watch(self, backends: Callable[[], Iterable[Backend]],
              in_flight: Callable[[str], int]) -> None:  # fmt: skip
        """Report the backends' state at each scrape (see the module docstring)."""
        self.registry.register(_BackendCollector(backends, in_flight))


class _BackendCollector(Collector):
    def __init__(self, backends: Callable[[], Iterable[Backend]], in_flight: Callable[[str], int]):
        self._backends = backends
        self._in_flight = in_flight

    def collect(self):
        up = GaugeMetricFamily("edgellm_gateway_backend_up", "1 if the backend is healthy",
                               labels=["backend"])  # fmt: skip
        flight = GaugeMetricFamily("edgellm_gateway_backend_in_flight",
                                   "Requests of this gateway running on the backend",
                                   labels=["backend"])  # fmt: skip
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests running on the engine",
                                    labels=["backend", "model_name"])  # fmt: skip
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting on the engine",
                                    labels=["backend", "model_name"])  # fmt: skip
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage (0..1)",
                                  labels=["backend", "model_name"])  # fmt: skip
        for backend in list(self._backends()):
            up.add_metric([backend.key], 1.0 if backend.healthy else 0.0)
            flight.add_metric([backend.key], float(self._in_flight(backend.key)))
            for model, load in list(backend.loads.items()):
                running.add_metric([backend.key, model], float(load.running))
                waiting.add_metric([backend.key, model], float(load.waiting))
                usage.add_metric([backend.key, model], float(load.kv_cache_usage))
        return [up, flight, running, waiting, usage]

    def describe(self):
        return []
