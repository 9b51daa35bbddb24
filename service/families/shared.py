"""What every family shares: seeds, request labels, the tanh -> pixel conversion, image geometry read from the
manifest, and the shape of the rules /v2 checks a graph's inputs against."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from service.imaging import to_uint8
from service.runtime import ModelVersion
from service.store import image_shape

# The label space of a conditional model whose manifest does not state `num_classes`: the MNIST digits that
# schemas.Digit accepts.
MNIST_CLASSES = 10
PIXEL_RANGE = (0.0, 255.0)  # what the graphs' image inputs take: 8-bit pixel values, not normalised ones


class InvalidField(ValueError):
    """A request value the model cannot take (a label it does not know, a latent of the wrong length, an unknown
    attribute): `field` names it as the client wrote it, e.g. "labels[2]". service/errors.py answers it 422."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def new_seed(seed: int | None) -> int:
    """The request's seed, or a fresh one that fits a JSON number exactly (< 2**53)."""
    return seed if seed is not None else secrets.randbits(53)


def num_classes(mv: ModelVersion) -> int:
    """The labels a conditional model knows, 0..num_classes-1, as its manifest's network arguments say."""
    return int(mv.manifest.model.get("num_classes", MNIST_CLASSES))


def label_array(labels: int | list[int] | None, n: int, default: int | np.ndarray, classes: int) -> np.ndarray:
    """The request's labels as an (n,) int64 array; `default` when it gave none. A label the model does not know
    (`classes` of them) is an InvalidField naming it. An (n,) int64 `default` is returned itself, not a copy, so pass a
    fresh array of draws."""
    if labels is None:
        default = np.asarray(default, np.int64)
        return default if default.shape == (n,) else np.broadcast_to(default, (n,)).copy()
    out = np.full(n, labels, np.int64) if isinstance(labels, int) else np.asarray(labels, np.int64)
    bad = np.flatnonzero((out < 0) | (out >= classes))
    if bad.size:
        field = "labels" if isinstance(labels, int) else f"labels[{bad[0]}]"
        raise InvalidField(field, f"this model knows labels 0..{classes - 1}, got {out[bad[0]]}")
    return out


def from_tanh(x: np.ndarray) -> np.ndarray:
    """A generator's or decoder's output in -1..1 (tanh range, any shape) as uint8 pixels 0..255."""
    return to_uint8((x + 1.0) * 127.5)


def to_model(images: np.ndarray) -> np.ndarray:
    """(n, H, W) uint8 pixels -> (n, 1, H, W) float32, what the graphs' image inputs take (values 0..255)."""
    return images[:, None].astype(np.float32)


def image_size(mv: ModelVersion) -> tuple[int, int]:
    """(height, width) of the model's images, from its manifest (the store checked that they are fixed)."""
    return image_shape(mv.manifest)


@dataclass(frozen=True)
class TensorRules:
    """What /v2 checks a graph's input values against beyond datatype and shape: input name -> (low, high) of
    its values, the inputs whose values must be whole numbers, the bound on dynamic axes other than the batch
    (the image's height: vstack and hrow take any number of rows up to it), and a rule across a request's
    inputs (the problem it finds, or None)."""
    ranges: dict[str, tuple[float, float]]
    whole: frozenset[str]
    max_axis: int
    check: Callable[[Mapping[str, np.ndarray]], str | None] | None = None
