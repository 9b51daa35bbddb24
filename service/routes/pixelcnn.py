"""POST /v1/pixelcnn/logprob (exact log-likelihood, one forward pass) and /v1/pixelcnn/sample."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.families import pixelcnn
from service.families.shared import new_seed
from service.routes.common import (
    ANY,
    OFFLOAD_PER_PIXEL_MAPS,
    V1_BODY,
    V1_MODEL,
    off_loop_if,
    read_images,
    reply,
    reply_images,
    resolve,
    unless_disconnected,
)
from service.runtime import ModelVersion
from service.schemas import LogprobRequest, LogprobResponse, PixelCNNSampleRequest, SampleResponse

router = APIRouter(prefix="/v1/pixelcnn", tags=["pixelcnn"], responses={**ANY, **V1_MODEL, **V1_BODY})


def _logprob_reply(mv: ModelVersion, out: dict, per_pixel: bool):
    return reply(mv, results=pixelcnn.logprob_results(out, per_pixel))


@router.post("/logprob", response_model=LogprobResponse)
async def logprob(body: LogprobRequest, request: Request):
    """log p(x) in nats and bits/dim for each image; `per_pixel` adds the 28x28 map of log p(x_t | x_<t)."""
    mv = resolve(request, "pixelcnn", body.model_version)
    images = await read_images(body.images, pixelcnn.input_size(mv))
    labels = pixelcnn.labels(mv, body.labels, len(images))
    out = await mv.run(pixelcnn.LOGPROB, pixelcnn.logprob_inputs(images, labels))
    big = body.per_pixel and len(images) >= OFFLOAD_PER_PIXEL_MAPS
    return await off_loop_if(big, _logprob_reply, mv, out, body.per_pixel)


@router.post("/sample", response_model=SampleResponse)
async def sample(body: PixelCNNSampleRequest, request: Request):
    """Autoregressive sampling, pixel by pixel: 784 sequential steps, so expect seconds, not milliseconds.
    Concurrent requests share every step (iteration-level batching): a new request joins at the next step.
    `guidance` w > 0 draws each pixel from (1 + w) * conditional - w * unconditional logits (classifier-free
    guidance): samples follow their label more closely. A client that disconnects stops its sampling."""
    mv = resolve(request, "pixelcnn", body.model_version)
    seed = new_seed(body.seed)
    u = pixelcnn.uniforms(seed, body.n, pixelcnn.input_size(mv))
    labels = pixelcnn.labels(mv, body.labels, body.n)
    ticket = mv.sampler.enqueue(labels, u, body.temperature, guidance=body.guidance)
    images = await unless_disconnected(request, mv.sampler.wait(ticket))
    return await reply_images(mv, images, body.format, seed=seed, labels=labels.tolist())
