"""service/__main__.py: the socket uvicorn shares between workers gets TCP_NODELAY on the stdlib event loop."""

from __future__ import annotations

import asyncio
import resource
import socket

import pytest
import uvicorn

from service.__main__ import _bind_sockets_as_tcp, _raise_open_files_limit


def nodelay_of_accepted(sock: socket.socket) -> int:
    """TCP_NODELAY of a connection accepted through `sock` by an asyncio (stdlib loop) server."""
    async def main() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                s = transport.get_extra_info("socket")
                seen.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            try:
                return await asyncio.wait_for(seen, 5)
            finally:
                writer.close()

    return asyncio.run(main())


def bound(monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    monkeypatch.setattr(uvicorn.Config, "bind_socket", uvicorn.Config.bind_socket)  # restored after the test
    _bind_sockets_as_tcp()
    _bind_sockets_as_tcp()  # idempotent
    return uvicorn.Config(app="service.app:create_app", host="127.0.0.1", port=0).bind_socket()


def test_shared_socket_names_tcp_so_accepted_connections_get_nodelay(monkeypatch):
    sock = bound(monkeypatch)
    assert sock.proto == socket.IPPROTO_TCP and sock.get_inheritable()
    assert nodelay_of_accepted(sock) != 0


def test_open_files_soft_limit_is_raised_to_the_hard_limit():
    """Every connection is a descriptor: at the usual soft limit of 1024, a thousand slow clients stopped the
    server from accepting anything, /healthz included."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        _raise_open_files_limit()
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised == (hard if hard != resource.RLIM_INFINITY else 1 << 20) and raised >= min(1024, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
