"""POST /v1/gan/sample: class-conditional samples from the GAN generator."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request

from service.imaging import encode_images, to_uint8
from service.routes.common import label_array, new_seed, reply, resolve
from service.schemas import GanSampleRequest, SampleResponse

router = APIRouter(prefix="/v1/gan", tags=["gan"])


@router.post("/sample", response_model=SampleResponse)
async def sample(body: GanSampleRequest, request: Request):
    """n images; `labels` picks digits (absent: each image's digit is drawn uniformly from the seed).
    Same seed, same request: same images, however the server batches it with others."""
    mv = resolve(request, "gan", body.model_version)
    seed = new_seed(body.seed)
    rng = np.random.default_rng(seed)
    z_dim = mv.manifest.graphs["generator"].inputs[0].shape[1]
    drawn = rng.integers(0, 10, body.n)                        # drawn even when labels are given: z stays the same
    labels = label_array(body.labels, body.n, drawn)
    z = (rng.standard_normal((body.n, z_dim)) * body.truncation).astype(np.float32)
    out = await mv.run("generator", {"z": z, "label": labels})
    images = to_uint8((out["image"][:, 0] + 1.0) * 127.5)        # tanh output -1..1 -> pixels
    return reply(mv, seed=seed, labels=labels.tolist(), images=encode_images(images, body.format))
