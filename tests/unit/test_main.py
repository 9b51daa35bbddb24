"""service/__main__.py: the socket uvicorn shares between workers gets TCP_NODELAY on the stdlib event loop; the open
files limit; the control folder the workers share."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import socket
import stat

import pytest
import uvicorn

from service.__main__ import _bind_sockets_as_tcp, _prepare_control_dir, _raise_open_files_limit
from service.control import ControlFolder
from service.settings import get_settings


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


def test_several_workers_get_a_private_control_folder_and_a_given_one_is_wiped(monkeypatch, tmp_path):
    """The control folder is set up before the workers are spawned (they inherit GENSERVE_CONTROL_DIR); an earlier
    run's desired state is not applied to a store read afresh."""
    monkeypatch.setenv("GENSERVE_WORKERS", "2")
    monkeypatch.delenv("GENSERVE_CONTROL_DIR", raising=False)   # restored after the test, set here or not
    get_settings.cache_clear()
    try:
        created = _prepare_control_dir()
        assert created and os.environ["GENSERVE_CONTROL_DIR"] == created
        assert stat.S_IMODE(os.stat(created).st_mode) == 0o700   # private: writing in it changes the models
        shutil.rmtree(created)

        given = tmp_path / "control"
        earlier = ControlFolder(given)
        earlier.publish("gan", {"versions": [1, 2], "traffic": {}}, "load")
        earlier.record(1, {}, {})
        monkeypatch.setenv("GENSERVE_CONTROL_DIR", str(given))
        get_settings.cache_clear()
        assert _prepare_control_dir() is None                      # given: kept, only wiped
        assert ControlFolder(given).read().generation == 0 and not list(given.rglob("*.json"))

        monkeypatch.setenv("GENSERVE_WORKERS", "1")                # one worker: no folder at all
        monkeypatch.delenv("GENSERVE_CONTROL_DIR")
        get_settings.cache_clear()
        assert _prepare_control_dir() is None and "GENSERVE_CONTROL_DIR" not in os.environ
    finally:
        get_settings.cache_clear()
