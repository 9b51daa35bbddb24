"""The GAN: a class-conditional generator. A request's labels and z come from its seed alone, so the same seed
gives the same images however the server batches it with others; the generator's tanh output becomes pixels."""

from __future__ import annotations

import numpy as np

from service.families.shared import MNIST_CLASSES, TensorRules, from_tanh, image_size, label_array, num_classes
from service.runtime import ModelVersion

GRAPH = "generator"


def z_dim(mv: ModelVersion) -> int:
    return mv.manifest.graphs[GRAPH].inputs[0].shape[1]


def draw(seed: int, n: int, z_dim: int, truncation: float = 1.0, labels: int | list[int] | None = None,
         classes: int = MNIST_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """A request's host-side randomness, from its seed alone: labels (n,) int64 and z (n, z_dim) float32."""
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, classes, n)  # drawn even when labels are given: z stays the same
    return label_array(labels, n, drawn, classes), (rng.standard_normal((n, z_dim)) * truncation).astype(np.float32)


def draw_for(mv: ModelVersion, seed: int, n: int, truncation: float = 1.0,
             labels: int | list[int] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(labels, the generator's inputs) of a request to this model version."""
    labels, z = draw(seed, n, z_dim(mv), truncation, labels, num_classes(mv))
    return labels, {"z": z, "label": labels}


def pixels(image: np.ndarray) -> np.ndarray:
    """The generator's (n, 1, H, W) tanh output, -1..1, as (n, H, W) uint8 pixels."""
    return from_tanh(image[:, 0])


def generated(out: dict[str, np.ndarray]) -> np.ndarray:
    """The generator's outputs as (n, H, W) uint8 pixels."""
    return pixels(out["image"])


def tensor_rules(mv: ModelVersion) -> TensorRules:
    """A label must be one the generator knows; there is no 'any digit' label."""
    height, _ = image_size(mv)
    return TensorRules(ranges={"label": (0.0, float(num_classes(mv) - 1))}, whole=frozenset(), max_axis=height)
