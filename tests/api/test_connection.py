"""What happens on the wire: a real uvicorn server (in a thread, on a loopback port, with the service's own
protocol class) driven over raw sockets, for the things a TestClient cannot show: whether a connection survives
an error, slow clients cut off, and 503s that come before the body is read."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import Request

from service.app import create_app
from service.protocol import GuardedH11Protocol, GuardedHttpToolsProtocol
from service.settings import Settings
from tests.api.conftest import free_port

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 0.6
BODY_TIMEOUT_S = 0.8


@dataclass
class Live:
    port: int
    app: object
    release: threading.Event  # opens the test-only /test/hold route

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


def start_server(tiny_store, protocol_base) -> Iterator[Live]:
    class Protocol(protocol_base):  # the service's protocol class, with a short header timeout
        header_timeout_s = HEADER_TIMEOUT_S

    app = create_app(Settings(store_path=tiny_store, max_inflight=2, body_timeout_s=BODY_TIMEOUT_S))
    release = threading.Event()

    @app.post("/test/boom")
    async def boom():  # an error no handler knows: the 500 path
        raise RuntimeError("boom")

    @app.post("/test/hold")
    async def hold(request: Request):
        await request.body()
        while not release.is_set():  # bounded by the test's own release
            await asyncio.sleep(0.01)
        return {"held": True}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=Protocol, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started or httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.05)
    try:
        yield Live(port, app, release)
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module", params=[GuardedHttpToolsProtocol, GuardedH11Protocol], ids=["httptools", "h11"])
def live(request, tiny_store) -> Iterator[Live]:
    yield from start_server(tiny_store, request.param)


def request_bytes(method: str, path: str, body: bytes = b"", length: int | None = None) -> bytes:
    """A request whose Content-Length is len(body), or `length` to announce more than is sent."""
    return (f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers lower-cased, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the body")
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def closed_by_peer(sock: socket.socket, within_s: float = 5.0) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_500_keeps_the_connection_for_the_next_request(live):
    with live.connect() as sock:
        sock.sendall(request_bytes("POST", "/test/boom", b"{}"))
        status, headers, body = read_response(sock)
        assert status == 500 and json.loads(body)["error"]["code"] == "internal"
        assert "boom" not in body.decode()                      # internals stay in the log
        sock.sendall(request_bytes("GET", "/healthz"))          # the same connection serves on
        assert read_response(sock)[0] == 200


def test_v2_null_and_true_in_data_are_400_and_the_connection_lives(live):
    with live.connect() as sock:
        for data in ([None] + [0.0] * 783, [True] + [0.0] * 783):
            body = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                           "data": data}]}).encode()
            sock.sendall(request_bytes("POST", "/v2/models/pixelcnn.logprob/infer", body))
            status, _, reply = read_response(sock)
            assert status == 400, reply
            assert ("null" if data[0] is None else "boolean") in json.loads(reply)["error"]
        sock.sendall(request_bytes("GET", "/healthz"))
        assert read_response(sock)[0] == 200


def test_slow_headers_get_408_and_are_closed(live):
    with live.connect() as sock:
        started = time.monotonic()
        for byte in b"GET /healthz HTTP/1.1\r\nHost: te":      # a slow drip that never finishes
            sock.sendall(bytes([byte]))
            time.sleep(0.02)
            if time.monotonic() - started > 5:
                break
        status, headers, body = read_response(sock)
        waited = time.monotonic() - started
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert HEADER_TIMEOUT_S * 0.9 <= waited < HEADER_TIMEOUT_S + 2.0
        assert closed_by_peer(sock)


def test_a_connection_that_sends_nothing_is_closed(live):
    with live.connect() as sock:
        started = time.monotonic()
        status, headers, _ = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 2.0
        assert closed_by_peer(sock)


def test_keep_alive_requests_are_not_cut_by_the_header_timer(live):
    """The clock runs per request: a connection used for longer than the timeout is fine."""
    with live.connect() as sock:
        for _ in range(4):
            sock.sendall(request_bytes("GET", "/healthz"))
            assert read_response(sock)[0] == 200
            time.sleep(HEADER_TIMEOUT_S / 2)


def test_a_slow_body_gets_408_with_connection_close(live):
    with live.connect() as sock:
        started = time.monotonic()
        sock.sendall(request_bytes("POST", "/v1/gan/sample", b'{"n"', length=50))
        status, headers, body = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and error["fields"][0]["field"] == "body"
        assert BODY_TIMEOUT_S * 0.9 <= time.monotonic() - started < BODY_TIMEOUT_S + 2.0
        assert closed_by_peer(sock)


def test_past_the_inflight_bound_503_comes_before_the_body(live):
    """Two requests hold the route's two slots; a third is answered 503 + Retry-After without its body having
    been sent at all; probes still answer; once the two finish, the route admits again."""
    live.release.clear()
    held = [live.connect() for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(request_bytes("POST", "/test/hold", b"{}"))
        time.sleep(0.3)
        with live.connect() as sock:
            sock.sendall(request_bytes("POST", "/test/hold", length=1_000_000))  # headers only: no body comes
            status, headers, body = read_response(sock)
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(body)["error"]["code"] == "overloaded"
        with live.connect() as sock:
            sock.sendall(request_bytes("GET", "/healthz"))     # probes are never refused
            assert read_response(sock)[0] == 200
            sock.sendall(request_bytes("POST", "/v1/gan/sample", b"{}"))  # another route has its own bound
            assert read_response(sock)[0] == 200
    finally:
        live.release.set()
    for sock in held:
        assert read_response(sock)[0] == 200
        sock.close()
    with live.connect() as sock:
        sock.sendall(request_bytes("POST", "/test/hold", b"{}"))
        assert read_response(sock)[0] == 200
