"""Request and response bodies of /v1, and the answers of the model control routes. Strict types: "3" is not a
number, 3.5 is not a count.

Images are validated by service.imaging (so errors name `images[i]`), hence `Any` as their type here, with a
JSON schema that states what imaging accepts. The schemas state every limit that validation enforces on its
own; what depends on the model (a latent's length, the attribute names) or on another field (labels: one per
image) is in the descriptions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from service.imaging import IMAGE_SIZE

MAX_SEED = 2**63 - 1
MAX_ITEMS = 256             # images, latents or samples in one request
MAX_PIXELCNN_SAMPLES = 64   # 784 sequential steps each
MAX_COMPLETIONS = 16        # completions of one image per request
PIXELCNN_GUIDANCE = 0.5     # the default weight, chosen from the measurements in README "Guidance"
ANOMALY_ALPHA = 0.01        # the default significance level of /v1/pixelcnn/anomaly
MAX_GUIDANCE = 20.0         # far past any useful weight; larger ones turn every pixel into an argmax
ImageFormat = Literal["png", "array"]
_PIXEL_ROW = {"type": "array", "minItems": IMAGE_SIZE, "maxItems": IMAGE_SIZE,
              "items": {"type": "integer", "minimum": 0, "maximum": 255}}
Image = Annotated[Any, WithJsonSchema({
    "description": f"base64 PNG string, or a {IMAGE_SIZE}x{IMAGE_SIZE} array of integers 0..255",
    "anyOf": [
        {"type": "string", "minLength": 1, "contentEncoding": "base64", "contentMediaType": "image/png",
         "description": f"a {IMAGE_SIZE}x{IMAGE_SIZE} PNG in base64, optionally as a data:image/png;base64, URI; "
                        "ASCII whitespace is ignored"},
        {"type": "array", "minItems": IMAGE_SIZE, "maxItems": IMAGE_SIZE, "items": _PIXEL_ROW,
         "description": "pixel rows, top to bottom"},
    ]})]
OutImage = str | list[list[int]]
Digit = Annotated[int, Field(ge=0, le=9)]
# A seed is an int64, which every client can hold. The format states that bound too: FastAPI's OpenAPI models
# turn every bound into a float, and 2**63-1 comes out as 2**63 (service.openapi puts the integer back).
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, json_schema_extra={"format": "int64"})]
# Latents are N(0, 1) draws that edits move by a few units. Near float32's maximum the decoder's arithmetic
# overflows (3e38 gives NaN: a black image); 1e4 leaves any real use room and the decoder far from that.
LatentValue = Annotated[float, Field(allow_inf_nan=False, ge=-1e4, le=1e4)]


class RequestBody(BaseModel):
    # The base of every /v1 request body (service.errors finds the union fields through it). A comment, not a
    # docstring: the schema's description is the one below.
    # JSON Schema counts 3.0 as an integer; these types do not, so every request schema says so
    model_config = ConfigDict(strict=True, extra="forbid", protected_namespaces=(), json_schema_extra={
        "description": "Strict types: an integer is written without a fraction (3, not 3.0), a number is not a "
                       "string, and a field not listed is refused."})
    model_version: int | None = Field(None, ge=1, description="default: the highest valid version")


class Readiness(BaseModel):
    """GET /readyz: 200 when ready; 503 while loading, while draining at shutdown, or while a required model has
    no version serving."""
    ready: bool
    models: dict[str, list[int]] = Field(description="model name -> versions loaded")
    refused: list[str] = Field(description="store paths refused at loading")
    missing: dict[str, list[str]] = Field(default_factory=dict,
                                          description="required model with no version serving -> why")
    pid: int = Field(description="the worker process that answered: readiness is per worker")


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    model_version: int


def _labels(most: int):
    """One digit for all, a list of one per image or sample (at most `most`), or None."""
    return Digit | Annotated[list[Digit], Field(min_length=1, max_length=most)] | None


def _labels_ok(v: int | list[int] | None, n: int | None) -> None:
    if isinstance(v, list) and n is not None and len(v) != n:
        raise ValueError(f"labels has {len(v)} entries but n is {n}: give one digit for all or a list of n digits")


class _LabelsForN(RequestBody):
    """Requests with `n` and `labels`: a list of labels must have n entries."""

    @field_validator("labels", check_fields=False)
    @classmethod
    def _n_labels(cls, v, info):
        _labels_ok(v, info.data.get("n"))
        return v


class GanSampleRequest(_LabelsForN):
    n: int = Field(1, ge=1, le=MAX_ITEMS)
    seed: Seed | None = Field(None, description="default: drawn at random and returned")
    labels: _labels(MAX_ITEMS) = Field(None, description="one digit for all, a list of n, or absent: any")
    truncation: float = Field(1.0, gt=0.0, le=1.0, description="noise scale psi; < 1 trades variety for fidelity")
    format: ImageFormat = "png"


class SampleResponse(_Response):
    seed: int
    labels: list[int] | None = None
    images: list[OutImage]


class ImagesResponse(_Response):
    images: list[OutImage]


class VaeEncodeRequest(RequestBody):
    images: list[Image] = Field(min_length=1, max_length=MAX_ITEMS)


class Latent(BaseModel):
    mean: list[float]
    std: list[float]


class VaeEncodeResponse(_Response):
    latents: list[Latent]


class VaeDecodeRequest(RequestBody):
    latents: list[Annotated[list[LatentValue], Field(min_length=1)]] = Field(
        min_length=1, max_length=MAX_ITEMS, description="each a list of d floats, the model's latent dimension")
    format: ImageFormat = "png"


class VaeSampleRequest(RequestBody):
    n: int = Field(1, ge=1, le=MAX_ITEMS)
    seed: Seed | None = None
    temperature: float = Field(1.0, gt=0.0, le=2.0, description="scale of the prior's standard deviation")
    format: ImageFormat = "png"


class VaeEditRequest(RequestBody):
    images: list[Image] = Field(min_length=1, max_length=MAX_ITEMS)
    # The route refuses a name the model does not know, '' included, as `edits.<name>`; a key constraint here
    # would name it `edits..[key]`. So the schema alone states that a name is not empty.
    edits: dict[str, Annotated[float, Field(ge=-5.0, le=5.0, allow_inf_nan=False)]] = Field(
        min_length=1, json_schema_extra={"propertyNames": {"minLength": 1}},
        description="attribute (GET /v1/vae/attributes) -> strength in training-set standard deviations")
    format: ImageFormat = "png"


class VaeInterpolateRequest(RequestBody):
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


class LogprobRequest(RequestBody):
    images: list[Image] = Field(min_length=1, max_length=MAX_ITEMS)
    per_pixel: bool = False
    labels: _labels(MAX_ITEMS) = Field(None, description="condition on digits: one for all or one per image; "
                                                         "absent: log p(x)")

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


class AnomalyRequest(RequestBody):
    images: list[Image] = Field(min_length=1, max_length=MAX_ITEMS)
    alpha: float = Field(ANOMALY_ALPHA, gt=0.0, lt=1.0,
                         description="the verdict's level: an image is anomalous when p_value or "
                                     "likelihood_p_value is below alpha / 2; must exceed 2 / (reference size + 1)")


class AnomalyResult(BaseModel):
    score: float = Field(description="-log2 p(x) - complexity_bits: how many more bits the model spends on the image "
                                     "than PNG does; higher = more anomalous (Serra et al., 2020)")
    logprob: float = Field(description="log p(x) of the 8-bit image, in nats, not conditioned on a digit")
    bits_per_dim: float
    complexity_bits: int = Field(description="the length of the image's smallest PNG file (any of the five filter "
                                             "types on every row, zlib level 9), in bits, its 63 bytes of "
                                             "signature, headers and framing included")
    p_value: float = Field(gt=0.0, le=1.0, description="the share of the version's held-out reference digits whose "
                                                       "score is at least as high, counting this image: (1 + k) / "
                                                       "(1 + N)")
    likelihood_p_value: float = Field(gt=0.0, le=1.0, description="the share of the reference digits at least as "
                                                                  "likely as this image, counting it: small for "
                                                                  "images likelier than digits ever are (blank ones)")
    anomalous: bool = Field(description="min(p_value, likelihood_p_value) < alpha / 2 (Bonferroni): at most alpha "
                                        "of the images drawn like the reference digits are flagged")


class AnomalyResponse(_Response):
    alpha: float
    reference_size: int = Field(description="N, the held-out digits the p-values are read against")
    results: list[AnomalyResult]


class PixelCNNSampleRequest(_LabelsForN):
    n: int = Field(1, ge=1, le=MAX_PIXELCNN_SAMPLES)
    seed: Seed | None = None
    # logits / temperature overflows float64 below ~1e-306; from 1e-3 on, sampling is all but argmax anyway
    temperature: float = Field(1.0, ge=1e-3, le=2.0, description="softmax temperature per pixel")
    labels: _labels(MAX_PIXELCNN_SAMPLES) = Field(None, description="one digit for all, a list of n, or absent: any")
    guidance: float = Field(
        PIXELCNN_GUIDANCE, ge=0.0, le=MAX_GUIDANCE,
        description="classifier-free guidance weight w: each pixel is drawn from (1 + w) * conditional - w * "
                    "unconditional logits; 0 samples the model as trained; no effect on 'any digit' samples")
    preview: bool = Field(False, description="streamed (Accept: text/event-stream) only: each progress event also "
                                             "carries the images as drawn so far, as base64 PNG")
    format: ImageFormat = "png"


_MASK_ROW = {"type": "array", "minItems": IMAGE_SIZE, "maxItems": IMAGE_SIZE,
             "items": {"type": "integer", "minimum": 0, "maximum": 1}}


class PixelCNNCompleteRequest(PixelCNNSampleRequest):
    image: Image = Field(description="the image whose known pixels are kept")
    n: int = Field(1, ge=1, le=MAX_COMPLETIONS, description="completions of the image")
    labels: _labels(MAX_COMPLETIONS) = Field(None, description="one digit for all, a list of n, or absent: any")
    known_rows: int | None = Field(None, ge=1, le=IMAGE_SIZE - 1,
                                   description="the top rows that are known: an exact conditional (give this or mask)")
    mask: Annotated[list[list[int]] | None, WithJsonSchema({
        "type": "array", "minItems": IMAGE_SIZE, "maxItems": IMAGE_SIZE, "items": _MASK_ROW,
        "description": "1 = known, 0 = to draw (give this or known_rows). A pixel is drawn from what precedes it in "
                       "raster order: known pixels after it are kept but do not inform it"})] = None


class SampleProgress(BaseModel):
    """The data of a streamed sample's `progress` event."""
    pixels_done: int = Field(ge=0, description="pixels drawn so far, over all the request's images")
    pixels_total: int = Field(ge=1, description="n x 28 x 28")
    preview: list[str] | None = Field(None, description="with `\"preview\": true` in the request: the n images as "
                                                        "drawn so far (base64 PNG, black where not drawn yet)")


# --- model control: the answers of the repository and traffic routes ------------------------------------------

class FailedWorker(BaseModel):
    pid: int
    message: str = Field(description="why this worker could not apply the change (its log says it too)")


class WorkersApplied(BaseModel):
    """How far a model change reached the worker processes (GENSERVE_WORKERS): the worker that answered applied it
    before answering; the others apply it from the control folder, and the answer waits up to
    GENSERVE_CONTROL_WAIT_S for them. With one worker: applied 1 of 1."""
    applied: int = Field(ge=1, description="workers that have applied it, the one that answered included")
    total: int = Field(ge=1, description="live workers; one still starting applies it before it turns ready")
    failed: list[FailedWorker] = Field(description="workers that could not apply it; the rest of total - applied "
                                                   "had not yet applied it when the answer was sent")


class RepositoryLoadResponse(BaseModel):
    model: str
    serving: list[int] = Field(description="the versions serving now")
    added: list[int] = Field(description="versions this load started serving")
    removed: list[int] = Field(description="versions that left (gone from disk or from the version policy): "
                                           "drained, then released")
    workers: WorkersApplied


class RepositoryUnloadResponse(BaseModel):
    model: str
    unloaded: list[int] = Field(description="the versions drained and released")
    workers: WorkersApplied


class TrafficResponse(BaseModel):
    model: str
    traffic: dict[str, float] = Field(description="version -> weight, as set; {}: the highest version serves")
    default_version: int = Field(description="the highest loaded version")
    workers: WorkersApplied
