"""POST /v1/pixelcnn/logprob (exact log-likelihood, one forward pass) and /v1/pixelcnn/sample."""

from __future__ import annotations

import math

import numpy as np
from fastapi import APIRouter, Request

from service.imaging import decode_images, encode_images
from service.routes.common import ANY, V1_BODY, V1_MODEL, label_array, new_seed, reply, resolve
from service.schemas import LogprobRequest, LogprobResponse, PixelCNNSampleRequest, SampleResponse

router = APIRouter(prefix="/v1/pixelcnn", tags=["pixelcnn"], responses={**ANY, **V1_MODEL, **V1_BODY})
ANY_DIGIT = 10
LN2 = math.log(2.0)


@router.post("/logprob", response_model=LogprobResponse)
async def logprob(body: LogprobRequest, request: Request):
    """log p(x) in nats and bits/dim for each image; `per_pixel` adds the 28x28 map of log p(x_t | x_<t)."""
    mv = resolve(request, "pixelcnn", body.model_version)
    images = decode_images(body.images)
    n = len(images)
    labels = label_array(body.labels, n, ANY_DIGIT)
    out = await mv.run("logprob", {"image": images[:, None].astype(np.float32), "label": labels})
    lp = out["log_probs"].astype(np.float64)                  # (n, 28, 28) nats
    totals = lp.reshape(n, -1).sum(axis=1)
    results = []
    for i in range(n):
        r = {"logprob": float(totals[i]), "bits_per_dim": float(-totals[i] / (lp[i].size * LN2))}
        if body.per_pixel:
            r["per_pixel"] = lp[i].tolist()
        results.append(r)
    return reply(mv, results=results)


@router.post("/sample", response_model=SampleResponse)
async def sample(body: PixelCNNSampleRequest, request: Request):
    """Autoregressive sampling, pixel by pixel: 784 sequential steps, so expect seconds, not milliseconds.
    Concurrent requests share every step (iteration-level batching): a new request joins at the next step."""
    mv = resolve(request, "pixelcnn", body.model_version)
    seed = new_seed(body.seed)
    u = np.random.default_rng(seed).random((body.n, 784))     # one uniform per pixel: the only randomness
    labels = label_array(body.labels, body.n, ANY_DIGIT)
    images = await mv.sampler.sample(labels, u, body.temperature)
    return reply(mv, seed=seed, labels=labels.tolist(), images=encode_images(images, body.format))
