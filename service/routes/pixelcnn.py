"""POST /v1/pixelcnn/logprob (exact log-likelihood, one forward pass), /anomaly (complexity-corrected scores with
calibrated p-values), /sample and /complete (pixel by pixel, on the iteration-level sampler)."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request

from service.families import pixelcnn
from service.families.shared import new_seed
from service.imaging import decode_image
from service.routes.common import (
    ANY,
    JSON,
    OFFLOAD_COMPLEXITY,
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
from service.routes.events import EVENT_STREAM, Pacing, event_stream, wants_event_stream
from service.runtime import ModelVersion
from service.schemas import (
    AnomalyRequest,
    AnomalyResponse,
    LogprobRequest,
    LogprobResponse,
    PixelCNNCompleteRequest,
    PixelCNNSampleRequest,
    SampleResponse,
)

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


@router.post("/anomaly", response_model=AnomalyResponse)
async def anomaly(body: AnomalyRequest, request: Request):
    """Is each image like the training data? `score` = -log2 p(x) minus the image's PNG length in bits (Serra et
    al., 2020: raw likelihood ranks simple images, all black, as the likeliest of all); `p_value` = the share of the
    version's held-out reference digits (scored at export, stored in its manifest) whose score is at least as high;
    `likelihood_p_value` = the share at least as likely; `anomalous` = either is below alpha / 2. Not conditioned on
    a digit."""
    mv = resolve(request, "pixelcnn", body.model_version)
    reference = pixelcnn.anomaly_reference(mv)
    pixelcnn.check_alpha(reference, body.alpha)
    images = await read_images(body.images, pixelcnn.input_size(mv))
    labels = pixelcnn.labels(mv, None, len(images))
    # deflate lets go of the GIL: a large batch's complexity is measured in a thread while the model runs
    complexity = asyncio.ensure_future(off_loop_if(len(images) >= OFFLOAD_COMPLEXITY, pixelcnn.complexity_bits,
                                                   images))
    try:
        out = await mv.run(pixelcnn.LOGPROB, pixelcnn.logprob_inputs(images, labels))
    finally:
        bits = await complexity
    results = pixelcnn.anomaly_results(out, bits, reference, body.alpha)
    return reply(mv, alpha=body.alpha, reference_size=len(reference.scores), results=results)


# The one sample route answers JSON, or events when the client asks for them: documented as two media types.
_EVENTS = " ".join([
    "`event: progress` at once, then at most every GENSERVE_SSE_PROGRESS_INTERVAL_S while pixels are drawn;",
    '`data`: {"pixels_done": int, "pixels_total": int}, plus "preview" (the images so far, base64 PNG) when the',
    'request says `"preview": true`. Then exactly one `event: result` whose `data` is the SampleResponse the plain',
    "request gets (same seed, same images), or one `event: error` whose `data` is the usual error body plus its",
    "`status` (e.g. 504 for a deadline). A `: keep-alive` comment line whenever nothing was sent for",
    "GENSERVE_SSE_HEARTBEAT_S. A client that disconnects stops its sampling.",
])
_STREAMED = {200: {
    "description": "The samples; with `Accept: text/event-stream`, a stream of server-sent events instead (status "
                   "and headers as soon as the request is admitted: every 4xx and 503 comes before it, as JSON)",
    "content": {EVENT_STREAM: {"schema": {"type": "string", "description": _EVENTS}}}}}


@router.post("/sample", response_model=SampleResponse, responses=_STREAMED)
async def sample(body: PixelCNNSampleRequest, request: Request):
    """Autoregressive sampling, pixel by pixel: 784 sequential steps, so expect seconds, not milliseconds.
    Concurrent requests share every step (iteration-level batching): a new request joins at the next step.
    `guidance` w > 0 draws each pixel from (1 + w) * conditional - w * unconditional logits (classifier-free
    guidance): samples follow their label more closely. A client that disconnects stops its sampling.
    With `Accept: text/event-stream` the answer streams progress events, then the same body as a `result` event."""
    mv = resolve(request, "pixelcnn", body.model_version)
    return await _sampled(request, mv, body)


@router.post("/complete", response_model=SampleResponse, responses=_STREAMED)
async def complete(body: PixelCNNCompleteRequest, request: Request):
    """n completions of one image: its known pixels (the top `known_rows` rows, or those a 0/1 `mask` marks) kept
    exactly, the others drawn pixel by pixel in raster order, each conditioned on everything above and to its left.
    With `known_rows` that is the exact conditional; with a mask, a pixel is drawn from what precedes it only (known
    pixels after it do not inform it). Runs on the sampler beside sampling requests, streams like `sample`."""
    mv = resolve(request, "pixelcnn", body.model_version)
    known = pixelcnn.known_pixels(mv, body.known_rows, body.mask)
    image = decode_image(body.image, "image", pixelcnn.input_size(mv))
    given = (np.repeat(image[None], body.n, axis=0), np.repeat(known[None], body.n, axis=0))
    return await _sampled(request, mv, body, given)


async def _sampled(request: Request, mv: ModelVersion, body: PixelCNNSampleRequest,
                   given: tuple[np.ndarray, np.ndarray] | None = None):
    """Queue the request's sequences on the sampler (refusals come here, before any byte), then answer JSON, or
    events when the client asks for them; a client that leaves stops its sequences."""
    seed = new_seed(body.seed)
    u = pixelcnn.uniforms(seed, body.n, pixelcnn.input_size(mv))
    labels = pixelcnn.labels(mv, body.labels, body.n)
    ticket = mv.sampler.enqueue(labels, u, body.temperature, guidance=body.guidance, given=given)

    async def answer() -> JSON:
        images = await mv.sampler.wait(ticket)
        return await reply_images(mv, images, body.format, seed=seed, labels=labels.tolist())

    if wants_event_stream(",".join(request.headers.getlist("accept"))):
        settings = request.app.state.settings
        pacing = Pacing(settings.sse_progress_interval_s, settings.sse_heartbeat_s)

        async def result() -> bytes:
            return (await answer()).body

        return event_stream(ticket, result, body.preview, pacing)
    try:
        return await unless_disconnected(request, answer())
    finally:  # a no-op once answered; otherwise (this task cancelled before answer() ran) nobody will wait for it
        ticket.abandon()
