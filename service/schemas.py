"""Request and response bodies of /v1. Strict types: "3" is not a number, 3.5 is not a count.

Images are validated by service.imaging (so errors name `images[i]`), hence `list[Any]` here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**63 - 1
ImageFormat = Literal["png", "array"]
Image = Annotated[Any, Field(description="base64 PNG string, or a 28x28 array of integers 0..255")]
OutImage = str | list[list[int]]
Digit = Annotated[int, Field(ge=0, le=9)]
# Latents are N(0, 1) draws that edits move by a few units. Near float32's maximum the decoder's arithmetic
# overflows (3e38 gives NaN: a black image); 1e4 leaves any real use room and the decoder far from that.
LatentValue = Annotated[float, Field(allow_inf_nan=False, ge=-1e4, le=1e4)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", protected_namespaces=())
    model_version: int | None = Field(None, ge=1, description="default: the highest valid version")


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    model_version: int


def _labels_ok(v: int | list[int] | None, n: int | None) -> None:
    if isinstance(v, list) and n is not None and len(v) != n:
        raise ValueError(f"labels has {len(v)} entries but n is {n}: give one digit for all or a list of n digits")


class _LabelsForN(_Request):
    """Requests with `n` and `labels`: a list of labels must have n entries."""

    @field_validator("labels", check_fields=False)
    @classmethod
    def _n_labels(cls, v, info):
        _labels_ok(v, info.data.get("n"))
        return v


class GanSampleRequest(_LabelsForN):
    n: int = Field(1, ge=1, le=256)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: drawn at random and returned")
    labels: Digit | list[Digit] | None = Field(None, description="one digit for all, a list of n, or absent: any")
    truncation: float = Field(1.0, gt=0.0, le=1.0, description="noise scale psi; < 1 trades variety for fidelity")
    format: ImageFormat = "png"


class SampleResponse(_Response):
    seed: int
    labels: list[int] | None = None
    images: list[OutImage]


class ImagesResponse(_Response):
    images: list[OutImage]


class VaeEncodeRequest(_Request):
    images: list[Image] = Field(min_length=1, max_length=256)


class Latent(BaseModel):
    mean: list[float]
    std: list[float]


class VaeEncodeResponse(_Response):
    latents: list[Latent]


class VaeDecodeRequest(_Request):
    latents: list[list[LatentValue]] = Field(min_length=1, max_length=256, description="each a list of d floats")
    format: ImageFormat = "png"


class VaeSampleRequest(_Request):
    n: int = Field(1, ge=1, le=256)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    temperature: float = Field(1.0, gt=0.0, le=2.0, description="scale of the prior's standard deviation")
    format: ImageFormat = "png"


class VaeEditRequest(_Request):
    images: list[Image] = Field(min_length=1, max_length=256)
    edits: dict[str, Annotated[float, Field(ge=-5.0, le=5.0, allow_inf_nan=False)]] = Field(
        min_length=1, description="attribute -> strength in training-set standard deviations")
    format: ImageFormat = "png"


class VaeInterpolateRequest(_Request):
    start: Image
    end: Image
    steps: int = Field(8, ge=2, le=64)
    method: Literal["slerp", "lerp"] = "slerp"
    format: ImageFormat = "png"


class Attribute(BaseModel):
    name: str
    description: str
    unit: str
    mean: float
    std: float


class VaeAttributesResponse(_Response):
    attributes: list[Attribute]


class LogprobRequest(_Request):
    images: list[Image] = Field(min_length=1, max_length=256)
    per_pixel: bool = False
    labels: Digit | list[Digit] | None = Field(None, description="condition on digits; absent: log p(x)")

    @field_validator("labels")
    @classmethod
    def _n_labels(cls, v, info):
        images = info.data.get("images")
        _labels_ok(v, len(images) if images is not None else None)
        return v


class LogprobResult(BaseModel):
    logprob: float = Field(description="log p(x) of the 8-bit image, in nats")
    bits_per_dim: float
    per_pixel: list[list[float]] | None = Field(None, description="28x28 map of log p(x_t | x_<t)")


class LogprobResponse(_Response):
    results: list[LogprobResult]


class PixelCNNSampleRequest(_LabelsForN):
    n: int = Field(1, ge=1, le=64)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # logits / temperature overflows float64 below ~1e-306; from 1e-3 on, sampling is all but argmax anyway
    temperature: float = Field(1.0, ge=1e-3, le=2.0, description="softmax temperature per pixel")
    labels: Digit | list[Digit] | None = None
    format: ImageFormat = "png"
