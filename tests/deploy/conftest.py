"""Shared helpers of the deploy tests: real processes on free loopback ports, always stopped in teardown.

The service-process helpers live in tests/api (free_port, server_process in conftest.py, scrape in
test_server_process.py) and are re-exported here, not duplicated.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx

from tests.api.conftest import free_port, server_process, stop_process
from tests.api.test_server_process import scrape

__all__ = ["DASHBOARD", "REPO", "dashboard_exprs", "free_port", "scrape", "server_process", "stop_process", "wait_http"]

REPO = Path(__file__).resolve().parents[2]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 30.0) -> None:
    """Poll url until it answers 200; fail at once with the log if the process exits. Bounded by timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} answered:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer 200 within {timeout_s:.0f} s:\n{log.read_text()}")


# ----------------------------------------------------------- system programs, the shipped store, the dashboard

SHIPPED_STORE = REPO / "models_store"


def require_tool(name: str) -> str:
    """The path of a system program that a deploy test drives (prometheus, promtool, docker-compose, ...).
    Fails, never skips, when it is missing."""
    import os
    import shutil

    import pytest

    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/sbin", "/sbin"]))
    if found is None:
        pytest.fail(f"{name} is not installed: `make system-deps` installs it (Debian packages)")
    return found


def wait_ready_everywhere(base: str, consecutive: int = 12, timeout_s: float = 120.0) -> None:
    """With several workers one /readyz 200 comes from one worker only: wait (bounded) until `consecutive`
    fresh connections in a row, which the kernel spreads over the workers, all answer 200."""
    deadline = time.monotonic() + timeout_s
    streak = 0
    while streak < consecutive:
        if time.monotonic() > deadline:
            raise AssertionError(f"{base}/readyz did not answer 200 {consecutive} times in a row in {timeout_s} s")
        try:
            ok = httpx.get(base + "/readyz", timeout=2).status_code == 200   # a new connection each time
        except httpx.TransportError:
            ok = False
        streak = streak + 1 if ok else 0
        if not ok:
            time.sleep(0.2)


DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "genserve.json"


def dashboard_exprs() -> list[str]:
    """Every PromQL query of the provisioned Grafana dashboard."""
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
