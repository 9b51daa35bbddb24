"""GET /playground in-process: the page and every file it loads are served from the package with a policy that
allows this origin only, none of them names another host, the digit endpoint hands out real held-out digits, and
the setting switches it all off. tests/api/test_playground_browser.py drives the page in Chromium."""

from __future__ import annotations

import re

import numpy as np
import pytest

from service.routes.playground import ASSETS
from tests.api.conftest import make_client, wait_ready
from tests.conftest import REPO
from training.data import load_dataset, split

STORE = REPO / "models_store"


@pytest.fixture(scope="module")
def client():
    with make_client(STORE, warmup=False, intra_op_threads=1) as c:
        wait_ready(c)
        yield c


def referenced(html: str, js_sources: dict[str, str]) -> set[str]:
    """Every same-origin file the page loads: its <script src> and <link href>, and the modules they import."""
    found = set(re.findall(r'(?:src|href)="/playground/([^"]+)"', html))
    for source in js_sources.values():
        found |= set(re.findall(r'from "\./([^"]+)"', source))
    return found


def test_the_page_and_its_files_are_served_with_a_same_origin_policy(client):
    page = client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "img-src 'self' data:"):
        assert directive in policy
    scripts = {p.name: p.read_text() for p in ASSETS.glob("*.js")}
    files = referenced(page.text, scripts)
    assert {"playground.js", "playground.css", "api.js", "pad.js", "view.js"} <= files
    media = {".js": "text/javascript", ".css": "text/css"}
    for name in files:
        r = client.get(f"/playground/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].startswith(media[name[name.rindex("."):]]), name
        assert r.headers["x-content-type-options"] == "nosniff"


def test_no_shipped_file_names_another_host():
    for path in ASSETS.iterdir():
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text()
            assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), path.name
            assert "@import" not in text and "url(" not in text, path.name


@pytest.mark.parametrize("path", ["/playground/nope.js", "/playground/heldout_digits.npz", "/playground/..%2Fapp.py",
                                  "/playground/.hidden.js", "/playground/playground.py"])
def test_anything_else_is_a_404(client, path):
    assert client.get(path).status_code == 404


def test_the_shipped_digits_are_the_held_out_split():
    heldout = split(load_dataset())[1]
    with np.load(ASSETS / "heldout_digits.npz") as shipped:
        assert np.array_equal(shipped["images"], heldout.images)
        assert np.array_equal(shipped["labels"], heldout.labels)


def test_the_digit_endpoint_hands_out_held_out_digits(client):
    heldout = split(load_dataset())[1]
    for index in (0, 137, 499):
        d = client.get("/playground/digit", params={"index": index}).json()
        assert d["index"] == index and d["label"] == heldout.labels[index]
        assert np.array_equal(np.array(d["pixels"], np.uint8), heldout.images[index])
    drawn = {client.get("/playground/digit").json()["index"] for _ in range(20)}
    assert len(drawn) > 1 and all(0 <= i < 500 for i in drawn)


@pytest.mark.parametrize("query, status, field", [("index=500", 404, None), ("index=-1", 422, "query.index"),
                                                  ("index=x", 422, "query.index")])
def test_a_bad_digit_index_is_refused(client, query, status, field):
    r = client.get(f"/playground/digit?{query}")
    assert r.status_code == status, r.text
    if field:
        assert r.json()["error"]["fields"][0]["field"] == field


def test_the_setting_switches_the_playground_off():
    with make_client(STORE, warmup=False, playground=False) as c:
        wait_ready(c)
        assert c.get("/playground").status_code == 404
        assert c.get("/playground/digit").status_code == 404
        assert c.get("/healthz").status_code == 200
