"""POST /v1/gan/sample: class-conditional samples from the GAN generator."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request

from service.imaging import encode_images, to_uint8
from service.routes.common import ANY, V1_BODY, V1_MODEL, label_array, new_seed, reply, resolve
from service.runtime import ModelVersion
from service.schemas import GanSampleRequest, SampleResponse

router = APIRouter(prefix="/v1/gan", tags=["gan"], responses={**ANY, **V1_MODEL, **V1_BODY})


def draw(seed: int, n: int, z_dim: int, truncation: float = 1.0,
         labels: int | list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A request's host-side randomness, from its seed alone: labels (n,) int64 and z (n, z_dim) float32."""
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, 10, n)  # drawn even when labels are given: z stays the same
    return label_array(labels, n, drawn), (rng.standard_normal((n, z_dim)) * truncation).astype(np.float32)


def z_dim(mv: ModelVersion) -> int:
    return mv.manifest.graphs["generator"].inputs[0].shape[1]


def pixels(image: np.ndarray) -> np.ndarray:
    """The generator's (n, 1, 28, 28) tanh output, -1..1, as (n, 28, 28) uint8 pixels."""
    return to_uint8((image[:, 0] + 1.0) * 127.5)


@router.post("/sample", response_model=SampleResponse)
async def sample(body: GanSampleRequest, request: Request):
    """n images; `labels` picks digits (absent: each image's digit is drawn uniformly from the seed).
    Same seed, same request: same images, however the server batches it with others."""
    mv = resolve(request, "gan", body.model_version)
    seed = new_seed(body.seed)
    labels, z = draw(seed, body.n, z_dim(mv), body.truncation, body.labels)
    out = await mv.run("generator", {"z": z, "label": labels})
    return reply(mv, seed=seed, labels=labels.tolist(), images=encode_images(pixels(out["image"]), body.format))
