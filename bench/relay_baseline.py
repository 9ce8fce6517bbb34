"""The baseline bench/bus.py compares the unit manager with: a minimal hand-written pyzmq relay.

Two roles, each its own process, doing only what the wire needs and nothing more (no
framing recovery, no deadlines, no setup/exit, no validation):

- ``relay``: a TCP server; each line a client sends gets ``"zmq_com":"<its PULL url>"``
  inserted and is published on one PUB; whatever arrives on a connection's PULL is written
  to that connection. One thread, one ``zmq.Poller`` over the TCP sockets and the PULLs.
- ``unit``: SUB on the relay's PUB; each message is answered with three pieces (the input
  text, ``hello``, the empty final piece) PUSHed to its ``zmq_com``, like the echo unit.

``python bench/relay_baseline.py relay --dir D`` prints ``relay listening on 127.0.0.1:PORT``;
``python bench/relay_baseline.py unit --dir D`` prints ``unit ready``. SIGTERM stops both.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

import zmq  # the baseline is raw pyzmq on purpose: what the comm layer is measured against


def run_relay(directory: str, port: int) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"ipc://{directory}/relay.pub")
    server = socket.create_server(("127.0.0.1", port))
    server.setblocking(False)
    poller = zmq.Poller()
    poller.register(server, zmq.POLLIN)
    conns: dict[int, tuple[socket.socket, zmq.Socket, bytes]] = {}  # fd -> (tcp, pull, url)
    pulls: dict[zmq.Socket, socket.socket] = {}
    buffers: dict[int, bytes] = {}
    next_id = 0
    print(f"relay listening on 127.0.0.1:{server.getsockname()[1]}", flush=True)
    while True:
        for item, _ in poller.poll():
            # pyzmq reports plain sockets by file descriptor
            if item == server.fileno() or item is server:
                conn, _ = server.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                url = f"ipc://{directory}/relay-{next_id}.sock"
                next_id += 1
                pull = ctx.socket(zmq.PULL)
                pull.bind(url)
                conns[conn.fileno()] = (conn, pull, url.encode())
                pulls[pull] = conn
                buffers[conn.fileno()] = b""
                poller.register(conn, zmq.POLLIN)
                poller.register(pull, zmq.POLLIN)
            elif isinstance(item, zmq.Socket):
                conn = pulls[item]
                while True:
                    try:
                        conn.sendall(item.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            else:
                fd = item if isinstance(item, int) else item.fileno()
                conn, pull, url = conns[fd]
                data = conn.recv(65536)
                if not data:
                    poller.unregister(conn)
                    poller.unregister(pull)
                    del pulls[pull], conns[fd], buffers[fd]
                    pull.close(linger=0)
                    conn.close()
                    continue
                lines = (buffers[fd] + data).split(b"\n")
                buffers[fd] = lines.pop()
                for line in lines:
                    if line:
                        pub.send(b'{"zmq_com":"' + url + b'",' + line[1:])


def run_unit(directory: str) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(f"ipc://{directory}/relay.pub")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    pushes: dict[str, zmq.Socket] = {}
    print("unit ready", flush=True)
    while True:
        msg = json.loads(sub.recv())
        url = msg["zmq_com"]
        push = pushes.get(url)
        if push is None:
            push = pushes[url] = ctx.socket(zmq.PUSH)
            push.connect(url)
        text = msg["data"]["delta"]
        for i, (delta, finish) in enumerate(((text, False), ("hello", False), ("", True))):
            push.send(
                json.dumps(
                    {
                        "created": int(time.time()),
                        "data": {"delta": delta, "finish": finish, "index": i},
                        "error": {"code": 0, "message": ""},
                        "object": msg.get("object", ""),
                        "request_id": msg["request_id"],
                        "work_id": msg["work_id"],
                    },
                    separators=(",", ":"),
                ).encode()
                + b"\n"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("relay", "unit"))
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    os.makedirs(args.dir, exist_ok=True)
    try:
        run_relay(args.dir, args.port) if args.role == "relay" else run_unit(args.dir)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
