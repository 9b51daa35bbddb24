"""The VAE: encode, decode, sample, attribute edits and latent interpolation."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Query, Request

from service.families import vae
from service.families.shared import new_seed
from service.imaging import decode_image
from service.routes.common import (
    ANY,
    V1_BODY,
    V1_MODEL,
    WATCHED_ITEMS,
    read_images,
    reply,
    reply_images,
    resolve,
    unless_disconnected,
)
from service.schemas import (
    ImagesResponse,
    SampleResponse,
    VaeAttributesResponse,
    VaeDecodeRequest,
    VaeEditRequest,
    VaeEncodeRequest,
    VaeEncodeResponse,
    VaeInterpolateRequest,
    VaeSampleRequest,
)

router = APIRouter(prefix="/v1/vae", tags=["vae"], responses={**ANY, **V1_MODEL})  # POST routes add V1_BODY
POST = {"responses": V1_BODY}  # what every POST route adds


@router.post("/encode", response_model=VaeEncodeResponse, **POST)
async def encode(body: VaeEncodeRequest, request: Request):
    """q(z|x) for each image: the mean and standard deviation of its diagonal Gaussian."""
    mv = resolve(request, "vae", body.model_version)
    images = await read_images(body.images, vae.input_size(mv))
    mean, std = vae.posterior(await mv.run(vae.ENCODER, vae.encoder_inputs(images)))
    return reply(mv, latents=[{"mean": m.tolist(), "std": s.tolist()} for m, s in zip(mean, std, strict=True)])


@router.post("/decode", response_model=ImagesResponse, **POST)
async def decode(body: VaeDecodeRequest, request: Request):
    mv = resolve(request, "vae", body.model_version)
    out = await mv.run(vae.DECODER, vae.decoder_inputs(vae.latents(mv, body.latents)))
    return await reply_images(mv, vae.decoded(out), body.format)


@router.post("/sample", response_model=SampleResponse, **POST)
async def sample(body: VaeSampleRequest, request: Request):
    """Decode z ~ N(0, temperature^2 I) drawn from the seed."""
    mv = resolve(request, "vae", body.model_version)
    seed = new_seed(body.seed)
    z = vae.prior(seed, body.n, vae.latent_dim(mv), body.temperature)
    work = mv.run(vae.DECODER, vae.decoder_inputs(z))
    out = await (unless_disconnected(request, work) if body.n >= WATCHED_ITEMS else work)
    return await reply_images(mv, vae.decoded(out), body.format, seed=seed)


@router.get("/attributes", response_model=VaeAttributesResponse)
async def attributes(request: Request, model_version: int | None = Query(None, ge=1)):
    mv = resolve(request, "vae", model_version)
    return reply(mv, attributes=[{"name": k, "description": a.description, "unit": a.unit, "mean": a.mean,
                                  "std": a.std} for k, a in mv.manifest.attributes.items()])


@router.post("/edit", response_model=ImagesResponse, **POST)
async def edit(body: VaeEditRequest, request: Request):
    """Encode, move the latent mean along each named attribute direction by `strength` training-set standard
    deviations of that attribute, decode. GET /v1/vae/attributes lists the attributes."""
    mv = resolve(request, "vae", body.model_version)
    shift = vae.edit_shift(mv, body.edits)
    images = await read_images(body.images, vae.input_size(mv))
    mean, _ = vae.posterior(await mv.run(vae.ENCODER, vae.encoder_inputs(images)))
    out = await mv.run(vae.DECODER, vae.decoder_inputs(mean + shift))
    return await reply_images(mv, vae.decoded(out), body.format)


@router.post("/interpolate", response_model=ImagesResponse, **POST)
async def interpolate(body: VaeInterpolateRequest, request: Request):
    """`steps` images from start to end (both included) along a path between their latent means."""
    mv = resolve(request, "vae", body.model_version)
    size = vae.input_size(mv)
    pair = np.stack([decode_image(body.start, "start", size), decode_image(body.end, "end", size)])
    work = _interpolate(mv, pair, body.steps, body.method)
    out = await (unless_disconnected(request, work) if body.steps >= WATCHED_ITEMS else work)
    return await reply_images(mv, vae.decoded(out), body.format)


async def _interpolate(mv, pair: np.ndarray, steps: int, method: str) -> dict:
    (a, b), _ = vae.posterior(await mv.run(vae.ENCODER, vae.encoder_inputs(pair)))
    return await mv.run(vae.DECODER, vae.decoder_inputs(vae.path(a, b, steps, method)))
