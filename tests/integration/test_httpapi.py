"""The shared HTTP stack (edgellm.httpapi) on a real server: every refusal in OpenAI's
error shape, limits on heads, bodies and connections, the API key."""

from __future__ import annotations

import json
import socket
import time

import pytest
from fastapi import FastAPI, Request

from edgellm.httpapi import HttpLimits, HttpServer, RequestGuard, install_error_handlers


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request):
        return {"size": len(await request.body())}

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok"}

    @app.get("/boom")
    async def boom():
        raise ZeroDivisionError("no")

    return app


@pytest.fixture
def server():
    limits = HttpLimits(max_body=1000, max_head=2048, max_connections=8, request_timeout=0.5)
    app = RequestGuard(_app(), api_key="sesame", max_body=1000, body_timeout=0.5, max_head=2048,
                       max_headers=20)
    with HttpServer(app, limits=limits) as srv:
        yield srv


def _exchange(srv: HttpServer, data: bytes, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one answer: status, headers, body (b"" if the server just closed)."""
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as sock:
        sock.sendall(data)
        return _read_answer(sock)


def _read_answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    with sock.makefile("rb") as reader:
        line = reader.readline()
        if not line:
            return 0, {}, b""
        status = int(line.split()[1])
        headers = {}
        while (line := reader.readline().strip()):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        return status, headers, reader.read(int(headers.get("content-length", 0)))


def _error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


AUTH = b"Authorization: Bearer sesame\r\n"


def test_api_key_guards_everything_but_health(server):
    status, headers, body = _exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                                              b"Content-Length: 2\r\n\r\n{}")  # fmt: skip
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert _error(body)["type"] == "authentication_error"
    wrong = b"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesamE\r\nContent-Length: 2\r\n\r\n{}"
    assert _exchange(server, wrong)[0] == 401
    ok = _exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 2\r\n\r\n{}")
    assert ok[0] == 200 and json.loads(ok[2]) == {"size": 2}
    assert _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    # unknown paths are refused before they are found missing: nothing leaks without the key
    assert _exchange(server, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 401


def test_not_found_method_not_allowed_and_unexpected_errors_are_openai_shaped(server):
    status, _, body = _exchange(server, b"GET /nope HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
    assert status == 404 and _error(body)["code"] == "not_found"
    status, headers, body = _exchange(server, b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD" and _error(body)["type"] == "invalid_request_error"
    status, _, body = _exchange(server, b"GET /boom HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
    assert status == 500 and _error(body)["type"] == "server_error"
    assert _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200  # still serving


def test_body_limits(server):
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\n" + AUTH
    status, headers, body = _exchange(server, head + b"\r\n")
    assert status == 411 and headers["connection"] == "close" and _error(body)["code"] == "length_required"
    status, headers, body = _exchange(server, head + b"Content-Length: 1001\r\n\r\n")
    assert status == 413 and headers["connection"] == "close" and _error(body)["code"] == "body_too_large"
    chunk = b"%x\r\n%s\r\n" % (600, b"x" * 600)
    status, _, body = _exchange(server, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 2)
    assert status == 413
    ok = _exchange(server, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk + b"0\r\n\r\n")
    assert ok[0] == 200 and json.loads(ok[2]) == {"size": 600}
    status, _, body = _exchange(server, head + b"Content-Length: x\r\n\r\n")
    assert status == 400


def test_stalled_heads_and_bodies_get_408_idle_connections_are_closed(server):
    started = time.monotonic()
    status, headers, body = _exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + AUTH
                                      + b"Content-Length: 10\r\n\r\n{")  # fmt: skip
    assert status == 408 and _error(body)["code"] == "request_timeout"
    status, _, body = _exchange(server, b"GET /health HTTP/1.1\r\nHo")  # half a head
    assert status == 408 and _error(body)["code"] == "request_timeout"
    assert _exchange(server, b"")[0] == 0  # nothing sent: closed without an answer
    assert time.monotonic() - started < 10


def test_malformed_or_oversized_heads_get_a_json_400_or_431(server):
    for data in (b"GET /a b HTTP/1.1\r\n\r\n", b"\x00\x01\x02\r\n\r\n",
                 b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 100_000):  # fmt: skip
        status, headers, body = _exchange(server, data)
        assert status == 400 and headers["content-type"] == "application/json"
        assert _error(body)["code"] == "bad_request"
    for data in (b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 4000 + b"\r\n\r\n",
                 b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 20 + b"\r\n"):  # fmt: skip
        status, headers, body = _exchange(server, data)
        assert status == 431 and _error(body)["code"] == "head_too_large"
    assert _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


def test_connections_over_the_limit_get_503_and_the_rest_are_served(server):
    held = [socket.create_connection((server.host, server.port), timeout=5) for _ in range(8)]
    try:
        time.sleep(0.1)  # accepted by the server's loop
        status, _, body = _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and _error(body)["code"] == "too_many_connections"
        held[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_answer(held[0])[0] == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] != 200:
        assert time.monotonic() < deadline, "connections freed"
        time.sleep(0.05)


def test_a_port_in_use_is_an_oserror_and_port_0_is_known_before_serving():
    first = HttpServer(_app()).bind()
    assert first.port > 0 and first.url == f"http://127.0.0.1:{first.port}"
    with pytest.raises(OSError):
        HttpServer(_app(), port=first.port).bind()
    first.stop()
    first.stop()
