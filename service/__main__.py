"""python -m service: serve the model store with uvicorn, settings from GENSERVE_* environment variables."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from service.control import ControlFolder
from service.memory import set_malloc_arenas
from service.protocol import SlowClientGuard, protocol_name
from service.settings import get_settings

log = logging.getLogger("service")


def _shared_dir(given: str | None, variable: str, prefix: str, wipe) -> str | None:
    """A folder the workers share: `given` (made if missing) is wiped of what an earlier run left, with
    wipe(path); unset, with several workers, a fresh private one (0700) is made and named in `variable`, set here,
    before uvicorn spawns the workers, which inherit the environment. Returns the folder when this function made
    it (so the caller removes it at exit), else None."""
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        wipe(Path(given))
        return None
    if get_settings().workers > 1:
        created = tempfile.mkdtemp(prefix=prefix)
        os.environ[variable] = created
        return created
    return None


def _wipe_metrics(path: Path) -> None:
    # The client's documentation: the directory must be wiped between runs (before start-up), or the counters of
    # an earlier run (e.g. a restarted container) are summed into this one. Only the client's own *.db files.
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def _prepare_multiprocess_dir() -> str | None:
    """Set up prometheus-client's multiprocess directory before any worker imports the client. Several workers
    need PROMETHEUS_MULTIPROC_DIR: without it each worker would expose only its own counts."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    return _shared_dir(given, "PROMETHEUS_MULTIPROC_DIR", "genserve-metrics-", _wipe_metrics)


def _prepare_control_dir() -> str | None:
    """Set up the control folder through which a model change reaches every worker (service/control.py). An
    earlier run's desired state is wiped: a server starts from the store, as with one worker. Whoever may write
    in it can change the models without the admin token, so one that others may write in is warned about."""
    settings = get_settings()
    if settings.workers == 1:
        return None
    given = str(settings.control_dir) if settings.control_dir else None
    if given and Path(given).exists() and Path(given).stat().st_mode & 0o022:
        log.warning("GENSERVE_CONTROL_DIR %s is writable by other users, who could change the models through it",
                    given)
    return _shared_dir(given, "GENSERVE_CONTROL_DIR", "genserve-control-", ControlFolder.wipe)


def _forget_dead_workers(path: str) -> None:
    """uvicorn has no child-exit hook (gunicorn's `child_exit` is where the client's documentation calls
    mark_process_dead), so each new worker does it for the processes that are gone, e.g. a crashed worker
    that uvicorn replaced: otherwise its last queue depth (a `livesum` gauge) and model info (`livemax`)
    would stay in the aggregate."""
    from prometheus_client.multiprocess import mark_process_dead

    for f in Path(path).glob("gauge_live*_*.db"):
        pid = f.stem.rsplit("_", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            mark_process_dead(int(pid), path)
        except PermissionError:  # alive, another user's
            pass


class _WithdrawLiveGaugesOnShutdown:
    """ASGI middleware: when the app's lifespan has shut down, the worker withdraws its live gauges itself
    (mark_process_dead on its own pid). Not atexit: uvicorn re-raises SIGTERM after a graceful shutdown, so
    the process ends by the signal and atexit handlers never run."""

    def __init__(self, app, path: str) -> None:
        self.app, self.path = app, path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message):
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                from prometheus_client.multiprocess import mark_process_dead

                mark_process_dead(os.getpid(), self.path)
            await send(message)

        await self.app(scope, receive, send_wrapper)


class _IgnoreHangupInServingProcess:
    """ASGI middleware: once the lifespan has started, SIGHUP is logged and ignored in this serving process,
    where its default action would kill it without draining. (Re-reading the store on SIGHUP waits for the
    model control API.)"""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _log_hangup)
        await self.app(scope, receive, send)


def _log_hangup(*_: object) -> None:
    log.warning("SIGHUP received and ignored (pid %d): model reload on SIGHUP is not supported yet", os.getpid())


class _Supervisor(Multiprocess):
    """uvicorn's multi-worker supervisor, except that SIGHUP does not restart every worker."""

    def handle_hup(self) -> None:
        _log_hangup()


def create_worker_app():
    """The app factory each uvicorn worker calls: create_app() plus what belongs to a serving process: the
    multiprocess-metrics bookkeeping, the slow-client metric and SIGHUP."""
    from service.app import create_app
    from service.metrics import multiprocess_dir

    set_malloc_arenas(get_settings().malloc_arenas)  # a worker of several: its own process, not main()'s
    app = create_app()
    SlowClientGuard.observer = app.state.metrics.on_client_timeout
    path = multiprocess_dir()
    if path:
        _forget_dead_workers(path)
        app.add_middleware(_WithdrawLiveGaugesOnShutdown, path=path)
    app.add_middleware(_IgnoreHangupInServingProcess)
    return app


def _raise_open_files_limit() -> None:
    """Every client connection takes a file descriptor; the usual soft limit of 1024 is far below what a
    loaded server holds (the hard limit is typically 1M), and past it accept() fails and nothing answers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-files limit from %d", soft)


def _bind_sockets_as_tcp() -> None:
    """With several workers uvicorn binds the shared socket itself, leaving its protocol number at 0; accepted
    sockets inherit it, and asyncio sets TCP_NODELAY only when it is IPPROTO_TCP. On the stdlib event loop
    every keep-alive response then waits for the client's delayed ACK (Kludex/uvicorn#3149, open; the figures
    are in docs/benchmarks.md). uvloop sets TCP_NODELAY
    itself. The bound socket is re-wrapped with its protocol named, so both loops get it."""
    original = uvicorn.Config.bind_socket
    if getattr(original, "names_tcp", False):
        return

    def bind_socket(self: uvicorn.Config) -> socket.socket:
        sock = original(self)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
            sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
            sock.set_inheritable(True)
        return sock

    bind_socket.names_tcp = True  # type: ignore[attr-defined]
    uvicorn.Config.bind_socket = bind_socket  # type: ignore[method-assign]


def main() -> None:
    settings = get_settings()
    set_malloc_arenas(settings.malloc_arenas)  # before any thread allocates
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    created = [d for d in (_prepare_multiprocess_dir(), _prepare_control_dir()) if d]
    _bind_sockets_as_tcp()
    _raise_open_files_limit()
    config = uvicorn.Config("service.__main__:create_worker_app", factory=True, host=settings.host,
                            port=settings.port, workers=settings.workers, log_level=settings.log_level,
                            access_log=False, loop=settings.loop, http=protocol_name(settings.http),
                            backlog=settings.backlog)
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            _Supervisor(config, sockets=[config.bind_socket()]).run()
        else:
            server.run()
    finally:
        for d in created:
            shutil.rmtree(d, ignore_errors=True)
    if config.workers == 1 and not server.started:
        raise SystemExit(3)  # uvicorn's STARTUP_FAILURE


if __name__ == "__main__":
    main()
