"""The playground in a real browser: Debian's Chromium, driven by Playwright, on a real server process with the
shipped models. It fails on any console error or uncaught exception and on any request to another host; it draws
strokes with the mouse and checks that the likelihood, the anomaly verdict, the reconstruction and an edit (a
slider moved with the keyboard) appear and change; completion and sampling stream to the end, and the same seed
gives the same GAN grid; on a phone-sized screen nothing scrolls sideways. It saves a screenshot into the test's
temporary folder, or to the path in PLAYGROUND_SCREENSHOT (how README's docs/images/playground.png is made)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.api.conftest import server_process, wait_for
from tests.conftest import REPO

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"   # Debian's package (make system-deps installs it)
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("playground") / "server.log"
    with server_process(REPO / "models_store", log, providers="cpu") as (base, _):
        yield base


@pytest.fixture
def browser_page(server):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is missing: `make system-deps` installs Debian's chromium package"
    problems: list[str] = []
    own_host = urlsplit(server).netloc
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
        page.on("request", lambda r: None if urlsplit(r.url).scheme == "data" or urlsplit(r.url).netloc == own_host
                else problems.append(f"request to another host: {r.url}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
        try:
            yield page, problems
        finally:
            browser.close()


def pixels(page, selector: str) -> list[int]:
    """The RGBA bytes of a canvas on the page."""
    return page.evaluate("""(selector) => {
        const canvas = document.querySelector(selector);
        return Array.from(canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data);
    }""", selector)


def stroke(page, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through `points`, given as fractions of the pad's width and height."""
    box = page.locator("#pad").bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def runs(page, name: str) -> int:
    return int(page.evaluate(f"document.body.dataset.{name}Runs || '0'"))


def after(page, name: str, action) -> None:
    """Do `action`, then wait until the page's `name` work (analysis, editing) ran and is idle: the panels it
    draws show the answers for the state `action` left."""
    before = runs(page, name)
    action()
    wait_for(f"the page's {name}", lambda: runs(page, name) > before
         and page.evaluate(f"document.body.dataset.{name}") == "idle")


def finished(page, button: str) -> None:
    wait_for(f"{button} to finish", lambda: page.evaluate(f"document.getElementById('{button}').disabled") is False)


def test_the_playground_in_chromium(browser_page, server, tmp_path):
    page, problems = browser_page
    from playwright.sync_api import expect

    page.goto(server + "/playground")
    newest = max(int(p.name) for p in (REPO / "models_store" / "pixelcnn").iterdir() if p.name.isdigit())
    expect(page.locator("#versions")).to_contain_text(f"pixelcnn v{newest}", timeout=WAIT_MS)
    expect(page.locator("#pixelcnn-samples img")).to_have_count(10, timeout=WAIT_MS)   # the first grid, streamed
    finished(page, "sample")

    after(page, "analysis", lambda: page.click("#clear"))
    blank = {"bpd": page.inner_text("#bpd"), "recon": pixels(page, "#recon"), "edited": pixels(page, "#edited")}

    after(page, "analysis", lambda: stroke(page, [(0.5, 0.2), (0.52, 0.5), (0.5, 0.8)]))        # a "1"
    one = {"bpd": page.inner_text("#bpd"), "recon": pixels(page, "#recon"), "edited": pixels(page, "#edited")}
    assert all(one[k] != blank[k] for k in one), "likelihood, reconstruction and edit follow the stroke"
    assert float(one["bpd"]) > float(blank["bpd"]) > 0
    expect(page.locator("#verdict")).not_to_have_text("…")
    assert "held-out digits" in page.inner_text("#anomaly-detail")

    after(page, "analysis", lambda: stroke(page, [(0.3, 0.3), (0.7, 0.3), (0.35, 0.8)]))       # a "7" over it
    seven = {"bpd": page.inner_text("#bpd"), "recon": pixels(page, "#recon"), "edited": pixels(page, "#edited")}
    assert all(seven[k] != one[k] for k in seven)

    def thicker():
        page.locator("#attr-thickness").focus()
        for _ in range(8):
            page.keyboard.press("ArrowRight")                                                  # +2 sd, by keyboard
    after(page, "editing", thicker)
    expect(page.locator("#attr-thickness-value")).to_have_text("2 sd")
    thick = pixels(page, "#edited")
    assert sum(thick[0::4]) > sum(seven["edited"][0::4])                          # a thicker digit: more ink

    page.click("#complete")
    finished(page, "complete")
    expect(page.locator("#completions img")).to_have_count(4)

    page.click("#interpolate")
    finished(page, "interpolate")
    expect(page.locator("#interpolation canvas")).to_have_count(8)

    grid = [pixels(page, f"#gan-samples canvas:nth-child({i + 1})") for i in range(10)]
    for seed in ("8", "7"):                                                       # another seed, then the first again
        page.fill("#seed", seed)
        page.click("#sample")
        finished(page, "sample")
    assert [pixels(page, f"#gan-samples canvas:nth-child({i + 1})") for i in range(10)] == grid

    statuses = page.locator("#requests td:nth-child(2)").all_inner_texts()
    assert statuses and set(statuses) == {"200"}, statuses
    assert page.inner_text("#error") == ""

    shot = Path(os.environ.get("PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    page.set_viewport_size({"width": 390, "height": 844})                         # a phone
    width, viewport = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= viewport
    assert problems == []
