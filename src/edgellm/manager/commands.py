"""``edgellm unit-manager`` (the daemon) and ``edgellm up`` (daemon + llm and echo units).

``edgellm unit-manager [--host H] [--port N] [--runtime-dir D] ...`` prints
``edgellm unit-manager (WHO) listening on H:PORT runtime_dir=D`` (WHO: loopback only, or open) once every socket is bound (with
the real port when ``--port 0``), serves until SIGTERM/SIGINT and exits 0 within 2 s,
leaving no socket file behind.

``edgellm up`` (what ``make run`` runs) starts the unit manager, ``edgellm unit llm`` (the
default model, unit ``llm``), ``edgellm unit echo`` (unit ``echo``) and the OpenAI gateway
(``edgellm serve`` on the manager's front door, 127.0.0.1:8000) as child processes sharing
one runtime dir, prints where to connect, and stops them all on Ctrl-C/SIGTERM (or when one
of them exits): the gateway first (it drains its requests in flight, at most
``GATEWAY_DRAIN`` seconds), then the units, then the manager.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import selectors
import signal
import re
import subprocess
import sys
import time

from edgellm.comm.urls import is_loopback
from edgellm.manager.config import ConfigError, load_config

log = logging.getLogger(__name__)

CHILD_START_TIMEOUT = 15.0
MODEL_START_TIMEOUT = 600.0
"""The llm unit loads its model first (converting the default GGUF once: ~20 s, more on a
busy machine)."""
CHILD_STOP_TIMEOUT = 3.0
GATEWAY_DRAIN = 10.0
"""Seconds the gateway gives requests in flight when ``up`` stops."""
_LISTENING = re.compile(r"listening on (\S+):(\d+)")


def _add_manager_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="TCP listen address (127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port, 0 = any free one (10001)")
    parser.add_argument(
        "--runtime-dir", help="directory of rpc.* sockets; unit/session sockets in D/llm (/tmp)"
    )
    parser.add_argument("--request-timeout", type=float, help="seconds a unit may stay silent (30)")
    parser.add_argument(
        "--setup-timeout", type=float, help="the same for setup, which may load a model (300)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("unit-manager", help="run the unit manager daemon")
    _add_manager_flags(parser)
    parser.add_argument("--no-tcp", action="store_true", help="serve only the sys RPC service")
    parser.add_argument("--zmq-s-format", help="server-side url format (ipc://D/llm/%%i.sock)")
    parser.add_argument("--zmq-c-format", help="client-side url format (ipc://D/llm/%%i.sock)")
    parser.add_argument("--min-port", type=int, help="first port of the unit url pool (5010)")
    parser.add_argument("--max-port", type=int, help="end of the unit url pool, excluded (5555)")
    parser.add_argument("--work-id", type=int, help="first work id number (0)")
    parser.add_argument("--rpc-timeout", type=float, help="seconds for a unit's RPC reply (3)")
    parser.add_argument(
        "--orphan-timeout", type=float,
        help="seconds before a task whose subscriber left is released (30)",
    )
    parser.add_argument("--max-message-bytes", type=int, help="TCP message size limit (1 MiB)")
    parser.add_argument(
        "--message-idle-timeout", type=float,
        help="seconds an incomplete TCP message may wait for its next bytes before it is "
        "answered -2 and dropped (10)",
    )
    parser.add_argument(
        "--answer-gap-ms", type=float,
        help="least ms between two answers to one client, for clients that read one message "
        "per recv() like upstream's sample/test.py (0)",
    )
    parser.add_argument("--ipc-mode", help="mode of created ipc dirs, octal (0700)")
    parser.add_argument("--lsmod-dir", help="directory of model *.json files for lsmode")
    parser.add_argument("--box-name", help="this box's name in pod keys <box>/<unit> (host name)")
    parser.add_argument("--allow-reboot", action="store_true",
                        help="let sys reboot run --reboot-command (refused otherwise)")  # fmt: skip
    parser.add_argument("--reboot-command", help="what sys reboot runs, e.g. 'systemctl reboot'")
    parser.set_defaults(handler=run_unit_manager)

    up = subparsers.add_parser(
        "up", help="run the unit manager, the llm unit and the echo unit (make run)"
    )
    _add_manager_flags(up)
    up.add_argument("--model", help="the llm unit's model: NAME=PATH or PATH (default model)")
    up.add_argument("--threads", type=int, help="the llm unit's PyTorch threads (all cores)")
    up.add_argument("--http-host", default="127.0.0.1",
                    help="the gateway's address (127.0.0.1; 0.0.0.0 opens it to the network)")
    up.add_argument("--http-port", type=int, default=8000, help="the gateway's port (8000)")
    up.add_argument("--api-key", default=os.environ.get("EDGELLM_API_KEY") or None,
                    help="the gateway's API key (default: $EDGELLM_API_KEY)")
    up.set_defaults(handler=run_up)


def run_unit_manager(args: argparse.Namespace) -> int:
    from edgellm.manager.server import serve

    overrides = {
        "host": args.host,
        "port": args.port,
        "runtime_dir": args.runtime_dir,
        "request_timeout": args.request_timeout,
        "setup_timeout": args.setup_timeout,
        "enable_tcp": False if args.no_tcp else None,
        "zmq_s_format": args.zmq_s_format,
        "zmq_c_format": args.zmq_c_format,
        "min_port": args.min_port,
        "max_port": args.max_port,
        "work_id": args.work_id,
        "rpc_timeout": args.rpc_timeout,
        "orphan_timeout": args.orphan_timeout,
        "max_message_bytes": args.max_message_bytes,
        "message_idle_timeout": args.message_idle_timeout,
        "answer_gap_ms": args.answer_gap_ms,
        "ipc_mode": args.ipc_mode,
        "lsmod_dir": args.lsmod_dir,
        "box_name": args.box_name,
        "allow_reboot": True if args.allow_reboot else None,
        "reboot_command": args.reboot_command,
    }
    try:
        config = load_config(overrides)
    except ConfigError as exc:
        print(f"edgellm unit-manager: {exc}", file=sys.stderr)
        return 2

    def ready(manager) -> None:
        where = f"{config.host}:{manager.port}" if config.enable_tcp else "(tcp disabled)"
        who = ("loopback only" if is_loopback(config.host) else
               "OPEN TO THE NETWORK: any client may set up tasks") if config.enable_tcp else "sys RPC only"
        print(f"edgellm unit-manager ({who}) listening on {where} "
              f"runtime_dir={config.runtime_dir}", flush=True)  # fmt: skip

    return asyncio.run(serve(config, ready))


# -- edgellm up -------------------------------------------------------------------------------


def _wait_for_line(proc: subprocess.Popen, marker: str, timeout: float) -> str | None:
    """Read the child's stdout until a line containing ``marker``; None on exit/timeout.

    The pipe is unbuffered bytes, so ``readline`` takes one line and select stays truthful."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                return None
            line = proc.stdout.readline().decode("utf-8", errors="replace")
            if not line:
                return None
            if marker in line:
                return line.strip()


def _stop_child(proc: subprocess.Popen, timeout: float = CHILD_STOP_TIMEOUT) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_up(args: argparse.Namespace) -> int:
    runtime_dir = args.runtime_dir or os.environ.get("EDGELLM_RUNTIME_DIR") or "/tmp"
    base = [sys.executable, "-m", "edgellm.cli", "--log-level", args.log_level]
    manager_cmd = [*base, "unit-manager", "--runtime-dir", runtime_dir]
    if args.host:
        manager_cmd += ["--host", args.host]
    if args.port is not None:
        manager_cmd += ["--port", str(args.port)]
    if args.request_timeout is not None:
        manager_cmd += ["--request-timeout", str(args.request_timeout)]
    if args.setup_timeout is not None:
        manager_cmd += ["--setup-timeout", str(args.setup_timeout)]
    llm_cmd = [*base, "unit", "llm", "--runtime-dir", runtime_dir, "--name", "llm"]
    if args.model:
        llm_cmd += ["--model", args.model]
    if args.threads:
        llm_cmd += ["--threads", str(args.threads)]
    echo_cmd = [*base, "unit", "echo", "--runtime-dir", runtime_dir, "--name", "echo"]

    def gateway_cmd(manager_line: str) -> list[str]:
        match = _LISTENING.search(manager_line)
        host = match.group(1) if match else "127.0.0.1"
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        cmd = [*base, "serve", "--box", f"{host}:{match.group(2) if match else 10001}",
               "--host", args.http_host, "--port", str(args.http_port),
               "--drain-timeout", str(GATEWAY_DRAIN)]  # fmt: skip
        if args.model:  # tokenise the unit's model as the unit does
            cmd += ["--tokenizer", args.model]
        if args.api_key:
            cmd += ["--api-key", args.api_key]
        return cmd

    # (command, its ready line, start timeout, a note first, stop timeout)
    steps = (
        (manager_cmd, "listening on", CHILD_START_TIMEOUT, None, CHILD_STOP_TIMEOUT),
        (llm_cmd, "ready", MODEL_START_TIMEOUT,
         "edgellm up: loading the llm unit's model (the first start converts it: ~20 s)",
         CHILD_STOP_TIMEOUT),
        (echo_cmd, "ready", CHILD_START_TIMEOUT, None, CHILD_STOP_TIMEOUT),
        (gateway_cmd, "listening on", MODEL_START_TIMEOUT, None, GATEWAY_DRAIN + 10),
    )

    # Signals wake the selector through a pipe; a child's exit shows as EOF on its stdout.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous_wakeup = signal.set_wakeup_fd(wake_w)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    children: list[tuple[subprocess.Popen, float]] = []
    manager_line = ""
    try:
        for cmd, marker, timeout, note, stop_timeout in steps:
            if note:
                print(note, flush=True)
            if callable(cmd):
                cmd = cmd(manager_line)
            # Own session: Ctrl-C's SIGINT reaches only us, and we stop the children in order.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
            children.append((proc, stop_timeout))
            line = _wait_for_line(proc, marker, timeout)
            if line is None:
                print(f"edgellm up: {' '.join(cmd[3:])} did not start", file=sys.stderr)
                return 1
            print(line, flush=True)
            manager_line = manager_line or line
        print(
            "edgellm up: StackFlow clients connect to the unit manager's address above (unit "
            "'llm' serves the model, unit 'echo' is the upstream test node); OpenAI clients to "
            "the gateway's, base URL <gateway>/v1; Ctrl-C stops them all",
            flush=True,
        )
        with selectors.DefaultSelector() as sel:
            sel.register(wake_r, selectors.EVENT_READ)
            for child, _ in children:
                sel.register(child.stdout, selectors.EVENT_READ, child)
            while True:
                for key, _ in sel.select():
                    if key.fd == wake_r:
                        return 0
                    line = key.fileobj.readline()
                    if not line:
                        print("edgellm up: a child process exited; stopping", file=sys.stderr)
                        return 1
                    print(line.decode("utf-8", errors="replace"), end="", flush=True)
    finally:
        for proc, stop_timeout in reversed(children):  # the gateway first, then the units
            _stop_child(proc, stop_timeout)
            if proc.stdout is not None:
                proc.stdout.close()
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
