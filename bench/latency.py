"""Single-request latency of every endpoint: one client, requests one after another, on a quiet server.

    python -m bench.latency [--store models_store] [--n 30]

Prints a Markdown table (p50 / p90 in milliseconds, HTTP status) for the README and the issue notes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

from bench.scenarios import load_digits
from bench.server import Server
from service.imaging import encode_png_b64


def cases(digit: str, other: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("GET", "/healthz", None),
        ("POST", "/v1/gan/sample", {"n": 1}),
        ("POST", "/v1/gan/sample", {"n": 64}),
        ("POST", "/v1/vae/encode", {"images": [digit]}),
        ("POST", "/v1/vae/decode", {"latents": [[0.0] * 16]}),
        ("POST", "/v1/vae/sample", {"n": 1}),
        ("POST", "/v1/vae/edit", {"images": [digit], "edits": {"thickness": 1.0}}),
        ("POST", "/v1/vae/interpolate", {"start": digit, "end": other, "steps": 8}),
        ("GET", "/v1/vae/attributes", None),
        ("POST", "/v1/pixelcnn/logprob", {"images": [digit]}),
        ("POST", "/v1/pixelcnn/logprob", {"images": [digit], "per_pixel": True}),
        ("POST", "/v1/pixelcnn/sample", {"n": 1, "seed": 0}),
        ("GET", "/v1/models", None),
    ]


def measure(store: Path, n: int) -> list[dict]:
    digits, _ = load_digits(2)
    a, b = encode_png_b64(digits[0]), encode_png_b64(digits[1])
    rows = []
    with Server(store) as server, httpx.Client(base_url=server.base, timeout=300) as client:
        for method, path, body in cases(a, b):
            reps = 3 if path == "/v1/pixelcnn/sample" else n       # a PixelCNN sample takes seconds
            client.request(method, path, json=body)                  # warm the route
            times, status = [], None
            for _ in range(reps):
                t0 = time.perf_counter()
                r = client.request(method, path, json=body)
                times.append(time.perf_counter() - t0)
                status = r.status_code
            rows.append({"method": method, "path": path, "body": json.dumps(body)[:40] if body else "",
                         "status": status, "p50_ms": 1000 * statistics.median(times),
                         "p90_ms": 1000 * float(np.percentile(times, 90)), "n": reps})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", type=Path, default=Path("models_store"))
    p.add_argument("--n", type=int, default=30)
    args = p.parse_args()
    print("| endpoint | request | status | p50 ms | p90 ms |\n|---|---|---|---|---|")
    for r in measure(args.store.resolve(), args.n):
        endpoint = f"`{r['method']} {r['path']}`"
        print(f"| {endpoint} | `{r['body']}` | {r['status']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} |")


if __name__ == "__main__":
    main()
