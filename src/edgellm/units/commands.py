"""``edgellm unit <kind>``: run a built-in unit in the foreground.

``edgellm unit echo [--name NAME] [--runtime-dir D]`` serves ``ipc://D/rpc.NAME`` (default
``llm`` under ``/tmp``, the upstream test node's name and paths), prints
``edgellm unit <name> ready`` once serving, and on SIGTERM/SIGINT releases its tasks, closes
its sockets, removes its files and exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from edgellm.comm.urls import DEFAULT_RUNTIME_DIR
from edgellm.unit import UnitConfig

log = logging.getLogger(__name__)


def _echo_unit(config: UnitConfig):
    from edgellm.units.echo import EchoUnit

    return EchoUnit(config)


UNIT_KINDS = {"echo": _echo_unit}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("unit", help="run a unit (echo)")
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
    parser.set_defaults(handler=run_unit)


def run_unit(args: argparse.Namespace) -> int:
    try:
        config = UnitConfig(name=args.name, runtime_dir=args.runtime_dir, max_tasks=args.max_tasks)
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
        unit = UNIT_KINDS[args.kind](config)
        try:
            unit.start()
        except (RuntimeError, OSError) as exc:  # OSError: EndpointError too
            print(f"edgellm unit: {exc}", file=sys.stderr)
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
