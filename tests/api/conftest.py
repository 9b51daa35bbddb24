"""The app in-process on the tiny store, started once per module, with settings overridden per test module."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings


def wait_ready(client: TestClient, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError("service did not become ready")


def make_client(store, **overrides) -> TestClient:
    return TestClient(create_app(Settings(store_path=store, **overrides)))


@pytest.fixture(scope="module")
def client(tiny_store):
    with make_client(tiny_store) as c:
        wait_ready(c)
        yield c


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_array(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="session")
def digit_images(digits) -> np.ndarray:
    """Four real held-out digits, (4, 28, 28) uint8."""
    return digits[2].images[:4]


def wait_for(what, check, timeout_s: float = 60.0, every_s: float = 0.05):
    """check() until it returns something truthy (then returned), for at most timeout_s; else the test fails,
    naming ``what`` (a string, or a function giving one, called then so it can tell what was seen)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out waiting for {what() if callable(what) else what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(store: Path, log: Path, timeout_s: float = 90.0,
                   **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m service` on `store` on a free loopback port, GENSERVE_* overrides from `env` (e.g.
    MAX_DELAY_MS="20"); yields (base URL, process) once /readyz answers 200, and stops the process after."""
    port = free_port()
    full_env = {**os.environ, "GENSERVE_STORE_PATH": str(store), "GENSERVE_PORT": str(port),
                "GENSERVE_LOG_LEVEL": "warning", **{f"GENSERVE_{k.upper()}": v for k, v in env.items()}}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)   # its own process group: stop_process reaches workers
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:               # bounded: gives up after timeout_s
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("server never became ready:\n" + log.read_text())
        yield base, proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (graceful for uvicorn, fast shutdown for nginx), then after timeout_s SIGKILL to the whole process
    group, so that uvicorn's or nginx's worker processes cannot outlive a hung parent; always reaped. Processes
    are started with start_new_session=True, so their group id is their pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
