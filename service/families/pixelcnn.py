"""The PixelCNN: exact log-likelihood in one forward pass, and autoregressive sampling whose only randomness is
one uniform per pixel drawn from the seed. Labels condition on a digit; the extra label num_classes means
"any digit" (the model was trained with it in place of a label some of the time)."""

from __future__ import annotations

import math

import numpy as np

from service.families.shared import (
    PIXEL_RANGE,
    InvalidField,
    TensorRules,
    image_size,
    label_array,
    num_classes,
    to_model,
)
from service.runtime import ModelVersion

LOGPROB = "logprob"
LN2 = math.log(2.0)


def input_size(mv: ModelVersion) -> tuple[int, int]:
    """(height, width) of the images the model scores and samples."""
    return image_size(mv)


def any_digit(mv: ModelVersion) -> int:
    """The label that conditions on no digit in particular: one past the digits."""
    return num_classes(mv)


def labels(mv: ModelVersion, given: int | list[int] | None, n: int) -> np.ndarray:
    """(n,) int64 labels of a request: the digits it gave, or "any digit"."""
    return label_array(given, n, any_digit(mv), num_classes(mv))


def logprob_inputs(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """(n, H, W) uint8 images and (n,) labels -> the logprob graph's inputs."""
    return {"image": to_model(images), "label": labels}


def logprob_results(out: dict[str, np.ndarray], per_pixel: bool) -> list[dict]:
    """The logprob graph's outputs, (n, H, W) log p(x_t | x_<t) in nats, as one result per image: log p(x) in
    nats and bits per dimension, and with `per_pixel` the map itself."""
    lp = out["log_probs"].astype(np.float64)
    n = len(lp)
    totals = lp.reshape(n, -1).sum(axis=1)
    results = []
    for i in range(n):
        r = {"logprob": float(totals[i]), "bits_per_dim": float(-totals[i] / (lp[i].size * LN2))}
        if per_pixel:
            r["per_pixel"] = lp[i].tolist()
        results.append(r)
    return results


def uniforms(seed: int, n: int, size: tuple[int, int]) -> np.ndarray:
    """(n, H*W) uniforms in [0, 1) from the seed alone: sampling's only randomness, one per pixel in raster order."""
    height, width = size
    return np.random.default_rng(seed).random((n, height * width))


def known_pixels(mv: ModelVersion, known_rows: int | None, mask: list[list[int]] | None) -> np.ndarray:
    """(H*W,) bool: which pixels of a completion's image are given, from `known_rows` (the top rows) or a 0/1 `mask`
    of the image's size; exactly one of them, leaving at least one pixel to draw."""
    height, width = input_size(mv)
    if (known_rows is None) == (mask is None):
        raise InvalidField("known_rows", "give exactly one of known_rows and mask")
    if known_rows is not None:
        if not 1 <= known_rows < height:
            raise InvalidField("known_rows", f"must lie in 1..{height - 1}")
        known = np.zeros((height, width), bool)
        known[:known_rows] = True
        return known.reshape(-1)
    array = np.asarray(mask, dtype=object)
    if array.shape != (height, width) or not all(v in (0, 1) and type(v) is int for v in array.flat):
        raise InvalidField("mask", f"must be {height}x{width} of 0 (draw) and 1 (known)")
    known = array.astype(bool).reshape(-1)
    if known.all():
        raise InvalidField("mask", "leaves no pixel to draw")
    return known


def tensor_rules(mv: ModelVersion) -> TensorRules:
    """Images of whole pixel values 0..255 (the model indexes its 256-way output with them) and labels up to
    num_classes, "any digit", for every graph; the step graphs take up to the image's height in rows."""
    height, _ = input_size(mv)
    return TensorRules(ranges={"image": PIXEL_RANGE, "label": (0.0, float(any_digit(mv)))},
                       whole=frozenset({"image"}), max_axis=height)
