"""guidance: what classifier-free guidance costs. Labelled PixelCNN samples of n = 1, 16 and 64 through the running
service, unguided (`"guidance": 0`) and at the default weight, the best of REPEATS timings each, on one server. A
guided sequence adds its unconditional twin to every graph call, so the cost should approach 2x as the step's
width, not its fixed overhead, dominates. How well the samples follow their label per weight is not a speed:
`python -m training guidance` measures that."""

from __future__ import annotations

import json
import time
import urllib.request

from bench.scenarios import Context
from bench.server import Server
from service.schemas import PIXELCNN_GUIDANCE

PATH = "/v1/pixelcnn/sample"
SIZES = (1, 16, 64)
REPEATS = 2
LABEL = 3


def _seconds(base: str, n: int, guidance: float, seed: int) -> float:
    body = json.dumps({"n": n, "seed": seed, "labels": LABEL, "guidance": guidance}).encode()
    request = urllib.request.Request(base + PATH, body, {"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"POST {PATH} answered {r.status}")
    return time.perf_counter() - started


def guidance(ctx: Context) -> dict:
    sizes = SIZES[:2] if ctx.quick else SIZES
    rows = []
    with Server(ctx.store, sampler_max_active=max(SIZES)) as srv:
        _seconds(srv.base, 1, PIXELCNN_GUIDANCE, 0)  # warm-up
        for n in sizes:
            best = {w: min(_seconds(srv.base, n, w, seed) for seed in range(REPEATS))
                    for w in (0.0, PIXELCNN_GUIDANCE)}
            rows.append({"n": n, "unguided_s": best[0.0], "guided_s": best[PIXELCNN_GUIDANCE],
                         "ratio": best[PIXELCNN_GUIDANCE] / best[0.0]})
            print(f"  n={n}: unguided {best[0.0]:.2f} s, guidance {PIXELCNN_GUIDANCE:g} "
                  f"{best[PIXELCNN_GUIDANCE]:.2f} s ({rows[-1]['ratio']:.2f}x)", flush=True)
    return {"guidance": {"weight": PIXELCNN_GUIDANCE, "label": LABEL, "rows": rows}, "floors": []}
