"""``edgellm kv-events``: discovery + KV event manager + prefix index + HTTP scoring.

    edgellm kv-events --pods pods.yaml --http-port 8091
    edgellm kv-events --unit-registry /tmp --http-port 8091
    edgellm kv-events --kubernetes [--namespace NS] [--label-selector SEL] --http-port 8091

Exactly one pod source. The manager runs enabled (the ``AIBRIX_PREFIX_CACHE_*`` switches
govern it only when embedded elsewhere). The index is in memory, or in Redis with
``--redis-url``; its limits come from the ``AIBRIX_SYNC_*`` / ``AIBRIX_PREFIX_CACHE_BLOCK_SIZE``
environment (see ``edgellm.kvindex.config``), ``--block-size`` overriding the latter.

With ``--share-pods`` (and ``--redis-url``) several replicas split the pods between them:
each pod is followed by the one replica holding its lease in Redis (``kvevents/leases.py``);
``--replica-id`` names this one (default: host, pid and a random suffix).

Once serving, one line ``kv-events (WHO) listening on http://HOST:PORT`` goes to stdout
(port 0 picks a free port); WHO says who may connect: loopback only by default
(``--http-host`` opens it), and whether ``--api-key`` guards it. With ``--kv-curve-secret`` and
``--kv-curve-server-key`` every subscription is CURVE-authenticated and encrypted
(:mod:`edgellm.comm.curve`). SIGTERM / SIGINT stop it in order: HTTP, manager, discovery, index.
Exit codes: 0 after a signal; 2 for bad arguments, an unusable pod source, an index not
ready within 30 s, or an HTTP port that cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from prometheus_client import CollectorRegistry

from edgellm.discovery.static_file import PodFileError
from edgellm.httpapi.server import access_note

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "kv-events", help="follow engines' KV events into a prefix index, score over HTTP"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pods", metavar="FILE", help="JSON/YAML file of pods (re-read on change)")
    source.add_argument("--unit-registry", metavar="RUNTIME_DIR", nargs="?", const="/tmp",
                        help="pods announced to the unit manager (sys RPC in RUNTIME_DIR)")
    source.add_argument("--kubernetes", action="store_true", help="pods from the Kubernetes API")
    parser.add_argument("--namespace", help="Kubernetes namespace (default: all)")
    parser.add_argument("--label-selector", help="Kubernetes label selector")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="seconds between checks of the pods file / unit registry")
    parser.add_argument("--http-host", default="127.0.0.1",
                        help="address to listen on (default loopback only; 0.0.0.0 or :: "
                             "opens it to the network)")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--api-key", default=os.environ.get("EDGELLM_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on every path but health "
                             "(default: $EDGELLM_API_KEY)")
    parser.add_argument("--block-size", type=int, help="tokens per block (default: env or 16)")
    parser.add_argument("--redis-url", help="keep the index in Redis/Valkey at this URL")
    parser.add_argument("--share-pods", action="store_true",
                        help="split the pods with the other replicas on this Redis (leases)")
    parser.add_argument("--replica-id", help="this replica's name among those sharing pods")
    add_curve_client_args(parser)
    parser.set_defaults(handler=run)


def add_curve_client_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a KV event subscriber's CURVE keys (:mod:`edgellm.comm.curve`)."""
    group = parser.add_argument_group("CURVE (KV event traffic between boxes; off by default)")
    group.add_argument("--kv-curve-secret", metavar="FILE",
                       default=os.environ.get("EDGELLM_KV_CURVE_SECRET") or None,
                       help="this subscriber's .key_secret (zmq.auth.create_certificates); "
                            "its .key goes into the publishers' --kv-curve-clients directory "
                            "($EDGELLM_KV_CURVE_SECRET)")  # fmt: skip
    group.add_argument("--kv-curve-server-key", metavar="FILE",
                       default=os.environ.get("EDGELLM_KV_CURVE_SERVER_KEY") or None,
                       help="the publishers' public .key ($EDGELLM_KV_CURVE_SERVER_KEY)")


def curve_client(args: argparse.Namespace):
    """The :class:`~edgellm.comm.curve.CurveClient` the flags name, or None; raises
    ``ValueError`` (:class:`~edgellm.comm.curve.CurveKeyError`) for half a configuration or
    an unusable file."""
    from edgellm.comm.curve import CurveClient, CurveKeyError

    secret, server = args.kv_curve_secret, args.kv_curve_server_key
    if secret is None and server is None:
        return None
    if secret is None or server is None:
        raise CurveKeyError("CURVE needs both --kv-curve-secret and --kv-curve-server-key")
    return CurveClient.from_files(secret, server)


def _provider(args: argparse.Namespace):
    if args.pods:
        from edgellm.discovery.static_file import FilePodProvider

        return FilePodProvider(args.pods, poll_interval=args.poll_interval)
    if args.unit_registry:
        from edgellm.discovery.unit_registry import UnitRegistryPodProvider

        return UnitRegistryPodProvider(runtime_dir=args.unit_registry,
                                       poll_interval=args.poll_interval)  # fmt: skip
    from edgellm.discovery.k8s import KubernetesPodProvider

    return KubernetesPodProvider(namespace=args.namespace, label_selector=args.label_selector)


def _index(args: argparse.Namespace):
    from edgellm.kvindex.config import IndexConfig

    overrides = {}
    if args.block_size is not None:
        overrides["block_size"] = args.block_size
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    config = IndexConfig.from_env(**overrides)
    if config.redis_url:
        from edgellm.kvindex.redis_index import RedisPrefixIndex

        return RedisPrefixIndex(config)
    from edgellm.kvindex.memory import MemoryPrefixIndex

    return MemoryPrefixIndex(config)


def run(args: argparse.Namespace) -> int:
    from edgellm.kvevents.config import ManagerConfig, SubscriberConfig
    from edgellm.kvevents.http import ScoreServer
    from edgellm.kvevents.manager import KVEventManager

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        index = _index(args)
    except ValueError as exc:
        print(f"kv-events: bad index configuration: {exc}", file=sys.stderr)
        return 2
    try:
        provider = _provider(args)
    except Exception as exc:  # e.g. no kubeconfig / not in a cluster
        print(f"kv-events: cannot set up pod discovery: {exc}", file=sys.stderr)
        index.close()
        return 2
    try:
        curve = curve_client(args)
    except ValueError as exc:
        print(f"kv-events: {exc}", file=sys.stderr)
        index.close()
        return 2
    registry = CollectorRegistry()
    leases = None
    if args.share_pods:
        from edgellm.kvevents.leases import LeaseConfig

        if not args.redis_url and not getattr(index, "take_over", None):
            print("kv-events: --share-pods needs --redis-url", file=sys.stderr)
            index.close()
            return 2
        leases = LeaseConfig(**({"replica_id": args.replica_id} if args.replica_id else {}))
    config = ManagerConfig(enabled=True, subscriber=SubscriberConfig(curve=curve))
    manager = KVEventManager(provider, index, config=config, registry=registry,
                             lease_config=leases)
    server = None
    try:
        try:
            provider.start()
            manager.start()
            server = ScoreServer(manager, index, registry, host=args.http_host,
                                 port=args.http_port, api_key=args.api_key)
        except (PodFileError, TimeoutError, OSError) as exc:
            # a bad pods file, an index never ready, a port in use, an API server down...
            print(f"kv-events: {exc}", file=sys.stderr)
            return 2
        server.start()
        print(f"kv-events ({access_note(server.host, args.api_key)}) listening on "
              f"http://{server.host}:{server.port}", flush=True)
        stop.wait()
        log.info("stopping")
        return 0
    finally:
        if server is not None:
            server.stop()
        manager.stop()
        provider.stop()
        index.close()
