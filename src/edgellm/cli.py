"""The one ``edgellm`` command.

Each area owns its subcommands in a ``commands`` module exposing ``register(subparsers)``;
this file only wires them together, importing each at start-up (they keep heavy imports inside their handlers).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edgellm import __version__

# Modules that contribute subcommands, in help order.
_COMMAND_MODULES = (
    "edgellm.manager.commands",  # unit-manager, up
    "edgellm.units.commands",  # unit <name>
    "edgellm.kvevents.commands",  # kv-events
    "edgellm.gateway.commands",  # serve
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgellm",
        description="edgellm: StackFlow-compatible unit manager and units, KV-cache-aware routing.",
    )
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
