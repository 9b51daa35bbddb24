"""Answers of the routes whose bodies service.schemas does not describe: /healthz and /v1/models. They mirror
what the service sends (routes/health.py, routes/models.py, ModelVersion.describe); the manifest's free-form
parts (model, dataset, metrics) stay dicts, as the manifest leaves them open. Unknown fields are ignored, so an
answer that gains one still parses; tests/api/test_client.py checks that every field the service sends is here."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["AttributeInfo", "BatchingInfo", "GraphInfo", "Health", "ModelDetail", "ModelList", "ModelSummary",
           "ProcessInfo", "RefusedVersion", "TensorInfo", "VersionDetail"]


class _Answer(BaseModel):
    model_config = ConfigDict(protected_namespaces=())   # `model` and `model_version` are field names here


class Health(_Answer):
    """GET /healthz: {"status": "ok"} while the process is alive."""
    status: str


class TensorInfo(_Answer):
    name: str
    dtype: str
    shape: list[int | None]          # None: a dynamic axis


class GraphInfo(_Answer):
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


class BatchingInfo(_Answer):
    max_batch_size: int
    max_delay_ms: float
    max_queue_items: int


class AttributeInfo(_Answer):
    """A VAE edit direction: the attribute's training-set mean and std, in `unit`."""
    description: str
    unit: str
    mean: float
    std: float


class _ModelHead(_Answer):
    name: str
    family: str
    default_version: int
    versions: list[int]
    traffic: dict[str, float] = {}   # version -> weight of requests naming none; empty: the default version


class ModelSummary(_ModelHead):
    """One model in GET /v1/models: its default version's provider, batching, metrics and graphs."""
    provider: str
    batching: BatchingInfo
    metrics: dict[str, Any]
    graphs: dict[str, GraphInfo]


class RefusedVersion(_Answer):
    """A store path refused at loading, with its problems."""
    path: str
    problems: list[str]


class ProcessInfo(_Answer):
    """The worker process that answered GET /v1/models: its resident memory in bytes (absent where the server
    cannot read it), the seconds from its start to loading and to ready, its memory releases, and per model and
    version (as a string) what loading and warm-up cost (`cold_start_s`, `load`, `warmup`, `graphs`)."""
    pid: int
    rss_bytes: int | None = None
    rss_peak_bytes: int | None = None
    rss_anon_bytes: int | None = None
    rss_file_bytes: int | None = None
    rss_shmem_bytes: int | None = None
    startup: dict[str, Any] = {}
    release: dict[str, Any] = {}
    models: dict[str, dict[str, Any]] = {}


class ModelList(_Answer):
    """GET /v1/models."""
    models: list[ModelSummary]
    refused: list[RefusedVersion]
    process: ProcessInfo | None = None


class VersionDetail(_Answer):
    """One version in GET /v1/models/{name}: its manifest as served, where it runs and how it batches."""
    name: str
    version: int
    family: str
    description: str
    provider: str
    providers: list[str]
    batching: BatchingInfo
    graphs: dict[str, GraphInfo]
    model: dict[str, Any]
    dataset: dict[str, Any]
    metrics: dict[str, Any]
    attributes: dict[str, AttributeInfo]


class ModelDetail(_ModelHead):
    """GET /v1/models/{name}: every version in detail, by version number."""
    details: dict[int, VersionDetail]
