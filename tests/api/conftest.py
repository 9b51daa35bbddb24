"""The app in-process on the tiny store, started once per module, with settings overridden per test module."""

from __future__ import annotations

import base64
import io
import time

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
