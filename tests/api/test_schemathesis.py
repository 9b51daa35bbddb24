"""Schemathesis over a live server: the OpenAPI document is the contract, and every check holds.

`st run` (the CLI, in a subprocess) generates requests from the document that a real `python -m service` serves
on the tiny store: examples, coverage (boundaries, and each constraint broken in turn), fuzzing and stateful
sequences, positive and negative, and checks every response with all of its checks: no 5xx, every status, content
type and header documented, every body as its schema says, schema-valid requests accepted and invalid ones
refused. Generation is deterministic (Hypothesis derandomized, no example database), so a run is reproducible;
the figures are printed. One worker: with two, Hypothesis's lambda descriptions race in CPython 3.11's `ast`
("AST constructor recursion depth mismatch", an error of the run, not of the service).

JSON Schema cannot state six rules, which the document gives in descriptions; for requests that are meant to be
valid (positive cases) the hooks below make those parts valid, the rest of the request staying as generated:

* an integer is written as one: JSON Schema counts 3.0 as an integer, and Schemathesis sends such spellings;
  the service's types are strict (3.0 is not a count, nor a pixel value), so they become 3;
* an image string is a base64 PNG of 28x28 pixels (the schema says base64 and image/png, which JSON Schema
  does not check): each becomes one;
* a list of labels has one per sample (n) or per image: it is cut or repeated to that length;
* a latent has the model's latent dimension: cut or repeated to it;
* an edit names an attribute the model knows: the names become those;
* a completion gives exactly one of known_rows and mask, and leaves a pixel to draw: a mask, when generated, is
  kept (its last pixel made unknown) and known_rows dropped; otherwise known_rows is set.

The hooks run in the `st` process, which imports this module through SCHEMATHESIS_HOOKS.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.api.conftest import png_b64, server_process

REPO = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = 30          # per operation and phase: ~1,700 requests, 1.5-2.5 minutes on 2 cores
MIN_REQUESTS = 1000
_HOOKS_ENV = "SCHEMATHESIS_GENSERVE_MODEL"   # JSON: what the hooks need to know of the served models
# one sample per route, method and status; a route's template has braces of its own ("/v2/models/{name}")
_COUNTED = re.compile(r'^genserve_http_requests_total\{.*\bstatus="(\d+)".*\} (\S+)$', re.M)


def requests_by_status(base: str) -> dict[int, int]:
    """The server's own count of the requests it answered, by status."""
    counts: dict[int, int] = {}
    for status, value in _COUNTED.findall(httpx.get(base + "/metrics", timeout=10).text):
        counts[int(status)] = counts.get(int(status), 0) + int(float(value))
    return counts


ADMIN_TOKEN = "schemathesis-admin-token-0123456789"


@pytest.mark.slow
def test_schemathesis_all_checks_pass_on_a_live_server(tiny_store, tmp_path):
    report = tmp_path / "report.json"
    # an admin token, sent with every request, so that the model control routes are exercised too (a request that
    # leaves it out must be a 401: schemathesis's ignored_auth check)
    with server_process(tiny_store, tmp_path / "server.log", admin_token=ADMIN_TOKEN) as (base, _):
        vae = httpx.get(base + "/v1/models/vae", timeout=10).json()["details"]
        latest = vae[max(vae, key=int)]
        model = {"latent_dim": latest["graphs"]["decoder"]["inputs"][0]["shape"][1],
                 "attributes": sorted(latest["attributes"])}
        before = requests_by_status(base)
        t0 = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json", "--checks", "all",
             "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic", "--workers", "1",
             "--request-timeout", "60", "--no-color", "--report", "json", "--report-json-path", str(report),
             "--header", f"Authorization: Bearer {ADMIN_TOKEN}"],
            # in tmp_path: Schemathesis and Hypothesis leave their caches in the working directory
            env={**os.environ, "SCHEMATHESIS_HOOKS": __name__, _HOOKS_ENV: json.dumps(model),
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
        seconds = time.monotonic() - t0
        after = requests_by_status(base)
    # every request since `before`, less that scrape itself (counted once it was answered)
    by_status = {s: n for s in sorted(after) if (n := after[s] - before.get(s, 0) - (s == 200))}
    made = sum(by_status.values())
    summary = json.loads(report.read_text()) if report.exists() else {}
    failures = sum(f["count"] for f in summary.get("failures", []))
    print(f"\nschemathesis {summary.get('schemathesis_version')}, all checks, deterministic: "
          f"{summary.get('test_cases', {}).get('generated')} test cases, {made} requests answered "
          f"{by_status}, {failures} failures, {len(summary.get('errors', []))} errors, {seconds:.0f} s")
    assert run.returncode == 0 and failures == 0 and not summary.get("errors"), run.stdout[-20000:] + run.stderr[-3000:]
    assert summary["stop_reason"] == "completed" and summary["operations"]["tested"] == summary["operations"]["total"]
    assert made >= MIN_REQUESTS, f"only {made} requests"


# --------------------------------------------------------------------------- hooks, in the `st` process

def _whole(value):
    """`value` with every float that spells an integer exactly (as Schemathesis writes them) as that integer."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


def _fit(values: list, length: int) -> list:
    """`values` cut or repeated to `length` (values is not empty: the schemas say minItems 1)."""
    return list(itertools.islice(itertools.cycle(values), length))


def _register_hooks() -> None:
    import schemathesis

    model = json.loads(os.environ[_HOOKS_ENV])
    png = png_b64(np.arange(28 * 28).reshape(28, 28) % 256)

    def image(value):
        return png if isinstance(value, str) else value

    @schemathesis.hook
    def map_case(context, case):
        if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(case.body, dict):
            return case
        case.body = body = _whole(case.body)
        for key in ("start", "end", "image"):
            if key in body:
                body[key] = image(body[key])
        if case.operation.path == "/v1/pixelcnn/complete":
            if isinstance(body.get("mask"), list):
                body.pop("known_rows", None)
                body["mask"][-1][-1] = 0
            else:
                body.pop("mask", None)
                body["known_rows"] = body.get("known_rows") or 14
        if case.operation.path == "/v1/pixelcnn/anomaly" and isinstance(body.get("alpha"), float | int):
            body["alpha"] = max(body["alpha"], 0.1)  # the least p-value, 1/(N+1), is the version's, not the schema's
        if isinstance(body.get("images"), list):
            body["images"] = [image(v) for v in body["images"]]
        if isinstance(body.get("labels"), list):
            count = len(body["images"]) if "images" in body else body.get("n", 1)
            body["labels"] = _fit(body["labels"], count)
        if isinstance(body.get("latents"), list):
            body["latents"] = [_fit(z, model["latent_dim"]) for z in body["latents"]]
        if isinstance(body.get("edits"), dict):
            names = itertools.cycle(model["attributes"])
            body["edits"] = dict(zip(names, body["edits"].values(), strict=False))
        return case


if os.environ.get("SCHEMATHESIS_HOOKS") == __name__ and _HOOKS_ENV in os.environ:
    _register_hooks()
