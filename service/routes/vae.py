"""The VAE: encode, decode, sample, attribute edits and latent interpolation."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Query, Request

from service.errors import invalid
from service.imaging import decode_image, decode_images, encode_images, to_uint8
from service.routes.common import ANY, V1_BODY, V1_MODEL, new_seed, reply, resolve
from service.runtime import ModelVersion
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


async def _encode(mv: ModelVersion, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 -> mean (n, d), logvar (n, d)."""
    out = await mv.run("encoder", {"image": images[:, None].astype(np.float32)})
    return out["mean"], out["logvar"]


async def _decode(mv: ModelVersion, z: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, 28, 28) uint8: the decoder's location, rounded (the most likely image, not a noisy draw)."""
    out = await mv.run("decoder", {"z": z.astype(np.float32)})
    return to_uint8((out["loc"][:, 0] + 1.0) * 127.5)             # location in -1..1 -> pixels


def _latent_dim(mv: ModelVersion) -> int:
    return mv.manifest.graphs["decoder"].inputs[0].shape[1]


@router.post("/encode", response_model=VaeEncodeResponse, responses=V1_BODY)
async def encode(body: VaeEncodeRequest, request: Request):
    """q(z|x) for each image: the mean and standard deviation of its diagonal Gaussian."""
    mv = resolve(request, "vae", body.model_version)
    mean, logvar = await _encode(mv, decode_images(body.images))
    std = np.exp(0.5 * logvar)
    return reply(mv, latents=[{"mean": m.tolist(), "std": s.tolist()} for m, s in zip(mean, std, strict=True)])


@router.post("/decode", response_model=ImagesResponse, responses=V1_BODY)
async def decode(body: VaeDecodeRequest, request: Request):
    mv = resolve(request, "vae", body.model_version)
    d = _latent_dim(mv)
    for i, z in enumerate(body.latents):
        if len(z) != d:
            raise invalid(f"latents[{i}]", f"expected {d} floats, got {len(z)}")
    images = await _decode(mv, np.asarray(body.latents, np.float64))
    return reply(mv, images=encode_images(images, body.format))


@router.post("/sample", response_model=SampleResponse, responses=V1_BODY)
async def sample(body: VaeSampleRequest, request: Request):
    """Decode z ~ N(0, temperature^2 I) drawn from the seed."""
    mv = resolve(request, "vae", body.model_version)
    seed = new_seed(body.seed)
    z = np.random.default_rng(seed).standard_normal((body.n, _latent_dim(mv))) * body.temperature
    images = await _decode(mv, z)
    return reply(mv, seed=seed, images=encode_images(images, body.format))


@router.get("/attributes", response_model=VaeAttributesResponse)
async def attributes(request: Request, model_version: int | None = Query(None, ge=1)):
    mv = resolve(request, "vae", model_version)
    return reply(mv, attributes=[{"name": k, "description": a.description, "unit": a.unit, "mean": a.mean,
                                  "std": a.std} for k, a in mv.manifest.attributes.items()])


@router.post("/edit", response_model=ImagesResponse, responses=V1_BODY)
async def edit(body: VaeEditRequest, request: Request):
    """Encode, move the latent mean along each named attribute direction by `strength` training-set standard
    deviations of that attribute, decode. GET /v1/vae/attributes lists the attributes."""
    mv = resolve(request, "vae", body.model_version)
    known = mv.manifest.attributes
    shift = np.zeros(_latent_dim(mv))
    for name, strength in body.edits.items():
        if name not in known:
            raise invalid(f"edits.{name}", f"unknown attribute '{name}'; known: {sorted(known)}")
        shift += strength * np.asarray(known[name].direction)
    mean, _ = await _encode(mv, decode_images(body.images))
    images = await _decode(mv, mean + shift)
    return reply(mv, images=encode_images(images, body.format))


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation (Shoemake, 1985), the path that stays at typical norms of a Gaussian prior.
    Falls back to linear when a and b are (anti)parallel."""
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return (1 - t)[:, None] * a + t[:, None] * b
    return (np.sin((1 - t) * omega)[:, None] * a + np.sin(t * omega)[:, None] * b) / np.sin(omega)


@router.post("/interpolate", response_model=ImagesResponse, responses=V1_BODY)
async def interpolate(body: VaeInterpolateRequest, request: Request):
    """`steps` images from start to end (both included) along a path between their latent means."""
    mv = resolve(request, "vae", body.model_version)
    pair = np.stack([decode_image(body.start, "start"), decode_image(body.end, "end")])
    (a, b), _ = await _encode(mv, pair)
    t = np.linspace(0.0, 1.0, body.steps)
    z = slerp(a, b, t) if body.method == "slerp" else (1 - t)[:, None] * a + t[:, None] * b
    images = await _decode(mv, z)
    return reply(mv, images=encode_images(images, body.format))
