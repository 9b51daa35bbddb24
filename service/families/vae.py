"""The VAE: an encoder to a diagonal Gaussian q(z|x), a decoder whose location (tanh range) is the image shown,
z ~ N(0, temperature^2 I) drawn from the seed, latent edits along attribute directions, and interpolation."""

from __future__ import annotations

import numpy as np

from service.families.shared import PIXEL_RANGE, InvalidField, TensorRules, from_tanh, image_size, to_model
from service.runtime import ModelVersion

ENCODER, DECODER = "encoder", "decoder"


def latent_dim(mv: ModelVersion) -> int:
    return mv.manifest.graphs[DECODER].inputs[0].shape[1]


def input_size(mv: ModelVersion) -> tuple[int, int]:
    """(height, width) of the images the encoder takes."""
    return image_size(mv)


def encoder_inputs(images: np.ndarray) -> dict[str, np.ndarray]:
    """(n, H, W) uint8 -> the encoder's inputs."""
    return {"image": to_model(images)}


def posterior(out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's outputs as q(z|x)'s mean (n, d) and standard deviation (n, d)."""
    return out["mean"], np.exp(0.5 * out["logvar"])


def decoder_inputs(z: np.ndarray) -> dict[str, np.ndarray]:
    """(n, d) latents -> the decoder's inputs."""
    return {"z": z.astype(np.float32)}


def decoded(out: dict[str, np.ndarray]) -> np.ndarray:
    """The decoder's location, rounded, as (n, H, W) uint8: the most likely image, not a noisy draw."""
    return from_tanh(out["loc"][:, 0])


def prior(seed: int, n: int, latent_dim: int, temperature: float) -> np.ndarray:
    """n latents z ~ N(0, temperature^2 I) from the seed alone, (n, latent_dim) float64."""
    return np.random.default_rng(seed).standard_normal((n, latent_dim)) * temperature


def latents(mv: ModelVersion, values: list[list[float]]) -> np.ndarray:
    """Request latents as (n, d) float64; one of another length than the decoder takes is a 422 naming it."""
    d = latent_dim(mv)
    for i, z in enumerate(values):
        if len(z) != d:
            raise InvalidField(f"latents[{i}]", f"expected {d} floats, got {len(z)}")
    return np.asarray(values, np.float64)


def edit_shift(mv: ModelVersion, edits: dict[str, float]) -> np.ndarray:
    """The latent shift (d,) of `edits` (attribute name -> strength in training-set standard deviations of the
    attribute); an attribute the manifest does not know is a 422 naming it."""
    known = mv.manifest.attributes
    shift = np.zeros(latent_dim(mv))
    for name, strength in edits.items():
        if name not in known:
            raise InvalidField(f"edits.{name}", f"unknown attribute '{name}'; known: {sorted(known)}")
        shift += strength * np.asarray(known[name].direction)
    return shift


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation (Shoemake, 1985), the path that stays at typical norms of a Gaussian prior.
    Falls back to linear when a and b are (anti)parallel."""
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return (1 - t)[:, None] * a + t[:, None] * b
    return (np.sin((1 - t) * omega)[:, None] * a + np.sin(t * omega)[:, None] * b) / np.sin(omega)


def path(a: np.ndarray, b: np.ndarray, steps: int, method: str) -> np.ndarray:
    """`steps` latents (steps, d) from a to b, both included: along a great circle ("slerp") or a line."""
    t = np.linspace(0.0, 1.0, steps)
    return slerp(a, b, t) if method == "slerp" else (1 - t)[:, None] * a + t[:, None] * b


def tensor_rules(mv: ModelVersion) -> TensorRules:
    """The encoder takes pixel values 0..255; unlike the PixelCNN's, they need not be whole (it does not index
    anything with them)."""
    height, _ = input_size(mv)
    return TensorRules(ranges={"image": PIXEL_RANGE}, whole=frozenset(), max_axis=height)
