"""The server under test: `python -m service` (or bench.bare) as a subprocess on a free loopback port,
with given settings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.cpu import own_seconds, process_tree_seconds

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


def _pid(body: bytes) -> object:
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer.get("pid") if isinstance(answer, dict) else None


class Server:
    """Context manager: start on enter (blocks until /readyz is 200, bounded), SIGTERM on exit.

    The environment is inherited (so GENSERVE_* tuning set by the caller applies), then host, port, store,
    log level and the given overrides are set on top.
    """

    def __init__(self, store: Path, ready_timeout_s: float = 120.0, module: str = "service", **settings: object):
        self.store, self.ready_timeout_s, self.module = Path(store), ready_timeout_s, module
        self.port = free_port()
        self.env = {**os.environ, "GENSERVE_HOST": HOST, "GENSERVE_PORT": str(self.port),
                    "GENSERVE_STORE_PATH": str(self.store), "GENSERVE_LOG_LEVEL": "warning"}
        self.env.update({f"GENSERVE_{k.upper()}": str(v) for k, v in settings.items()})
        self.settings = {k: str(v) for k, v in settings.items()}
        self.workers = int(self.env.get("GENSERVE_WORKERS", "1"))
        self.proc: subprocess.Popen | None = None
        self.log = Path(tempfile.mkstemp(prefix="genserve-bench-", suffix=".log")[1])
        self.startup_s = float("nan")

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self.stop()
        if exc_type is None:
            self.log.unlink(missing_ok=True)  # kept (and named in the error) when something went wrong

    def start(self) -> None:
        t0 = time.monotonic()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module], cwd=REPO, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline, ready = t0 + self.ready_timeout_s, set()
        while time.monotonic() < deadline:  # bounded: gives up after ready_timeout_s
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode} (log {self.log}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=1) as r:
                    # Readiness is per worker, and a worker still warming up accepts no connection, so each
                    # worker's own ready answer (its pid) is awaited; one connection each time. A server
                    # that names no pid (the LitServe peer answers "ok") is one answer.
                    ready.add(_pid(r.read()))
                    if len(ready) >= self.workers:
                        self.startup_s = time.monotonic() - t0
                        return
                    time.sleep(0.01)
                    continue
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"server not ready after {self.ready_timeout_s:.0f} s (log {self.log}):\n{self.tail()}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (the server finishes accepted work), SIGKILL after `grace_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def cpu_seconds(self) -> float:
        """CPU seconds the server has used so far: the supervisor, its workers and all their threads."""
        return process_tree_seconds(self.proc.pid) if self.proc is not None else float("nan")

    def cpu_probe(self) -> tuple[float, float]:
        """(this server's CPU seconds, the load generator's own) so far: closed_loop's per-request split."""
        return self.cpu_seconds(), own_seconds()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
