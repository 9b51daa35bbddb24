"""Typed settings from the environment (prefix GENSERVE_), injected into the app; tests pass their own."""

from __future__ import annotations

import json
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.store import MODEL_NAME


def available_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota ("200000 100000" is two
    cores), which is how `docker run --cpus` and a Kubernetes CPU limit restrict a container; neither shows in
    the affinity or in os.cpu_count(), which report the host's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or an unexpected format: the affinity stands
        pass
    return cores


class BatchingOverride(BaseModel):
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    max_delay_ms: float | None = Field(None, ge=0, le=1000)


class LatestVersions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latest: int = Field(ge=1, description="the highest N version folders")


class SpecificVersions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    specific: list[int] = Field(min_length=1, description="these version numbers")


VersionPolicy = Literal["all"] | LatestVersions | SpecificVersions


# A secret (the admin token, an API key) travels in an HTTP header and is shown nowhere, not even in the key ids
# of the metrics (service.auth), which a short one would let anyone reverse by trying every value.
SECRET_MIN_CHARS = 16
_SECRET_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: what a header value keeps as is


def _check_secret(secret: str, what: str) -> str:
    """`secret` if it can be a token; otherwise a ValueError saying why, never showing it."""
    if not secret:
        raise ValueError(f"{what} is empty")
    if not _SECRET_CHARS.fullmatch(secret):
        newline = " (a trailing newline, as `kubectl create secret --from-file` keeps?)" if secret[-1].isspace() else ""
        raise ValueError(f"{what} must be printable ASCII without spaces, as it travels in an HTTP header{newline}")
    if len(secret) < SECRET_MIN_CHARS:
        raise ValueError(f"{what} has {len(secret)} characters, fewer than {SECRET_MIN_CHARS} (make one with "
                         "`openssl rand -hex 32`)")
    return secret


def read_api_keys(value: str) -> list[str]:
    """GENSERVE_API_KEYS as written: a JSON list of keys, or the path of a file holding one key per line, where
    blank lines and lines starting with `#` are left out (a Kubernetes or Docker secret mounted as a file).
    Errors name the line or the position, never a key."""
    if not value.strip():
        raise ValueError("GENSERVE_API_KEYS is empty: unset it to serve without API keys")
    if value.lstrip().startswith("["):
        try:
            keys = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"GENSERVE_API_KEYS is not a JSON list: {exc.msg} at character {exc.pos}") from None
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("GENSERVE_API_KEYS must be a JSON list of strings")
        return keys
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
        raise ValueError(f"GENSERVE_API_KEYS is neither a JSON list nor a readable file: {path}: {reason}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        if (key := line.strip()) and not key.startswith("#"):
            keys.append(_check_secret(key, f"the key on line {number} of {path}"))
    return keys


class Settings(BaseSettings):
    # A validation error names the setting and the rule, never the value given: two of the settings are secrets.
    model_config = SettingsConfigDict(env_prefix="GENSERVE_", env_nested_delimiter="__", extra="ignore",
                                      hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes")
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "asyncio", description="event loop (auto: uvloop if installed). Not uvloop by default: under a flood of new "
                               "connections it accepted them seconds late, while the stdlib loop kept up")
    http: Literal["auto", "h11", "httptools"] = Field("auto", description="HTTP parser (auto: httptools if "
                                                                         "installed)")
    store_path: Path = Path("models_store")
    required_models: list[Annotated[str, Field(pattern=f"^{MODEL_NAME}$")]] | None = Field(
        None, description='models that must have a version serving for /readyz to answer 200, a JSON list, e.g. '
                          '["gan", "vae"]; unset: every model folder in the store')
    providers: str = Field("auto", description="auto, cpu, cuda, or comma-separated ONNX Runtime provider names")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per session; 0 = the cores split "
                                                       "between the workers")
    inter_op_threads: int = Field(1, ge=1)
    cuda_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = Field(
        "HEURISTIC", description="cuDNN convolution algorithm choice of the CUDA provider; EXHAUSTIVE benchmarks "
                                 "each new input shape")
    cuda_buckets: list[int] = Field(
        [1, 8], description="on the CUDA provider, batch sizes with a session of their own (the max batch size "
                            "always has one); batches are padded to the next, so each session keeps one shape. "
                            "[] turns this off")
    ort_spinning: bool = Field(False, description="let idle ONNX Runtime threads spin (busy-wait) for work")
    ort_graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level")
    ort_arena: Literal["off", "shared", "session"] = Field(
        "off", description="ONNX Runtime's memory arena on the CPU provider: off, the C allocator (glibc's heap "
                           "reuses what calls free); shared, one arena for every session of the process that grows "
                           "by what a call asks (kSameAsRequested); session, one per session that doubles as it "
                           "grows (ONNX Runtime's default)")
    max_call_images: dict[str, Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: {"logprob": 8, "vstack": 8, "hrow": 8},
        description='CPU provider: per graph name, the most images\' worth of pixels one ONNX Runtime call takes (a '
                    'sequence of h rows counts h / image size); a larger batch runs in slices of it, so that a call\'s '
                    'activations stay small. JSON, e.g. {"logprob": 8}; {} turns slicing off')
    warmup_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        [1], min_length=1, description="the batch sizes warm-up runs each graph at (capped at its max batch size); "
                                       "graphs with CUDA bucket sessions run at every bucket instead")
    malloc_arenas: int = Field(2, ge=0, le=64, description="glibc malloc arenas of a serving process (M_ARENA_MAX, "
                                                           "set as it starts); 0: glibc's default, 8 per core")
    memory_release_idle_s: float = Field(
        5.0, ge=0, le=3600, description="once ONNX Runtime has made no call for this long, the memory its arena "
                                        "holds unused and the C heap's free pages go back to the system (also once "
                                        "after warm-up); 0: never")
    memory_target_mib: float = Field(
        256.0, ge=0, le=1 << 20, description="while RSS is above this (and 32 MiB above what the last release "
                                             "left), memory goes back as soon as ONNX Runtime pauses (a quarter "
                                             "second without a call) instead of after "
                                             "GENSERVE_MEMORY_RELEASE_IDLE_S; 0: no target")
    worker_threads: int = Field(2, ge=1, le=64, description="threads that call ONNX Runtime off the event loop")
    batching: dict[str, BatchingOverride] = Field(
        default_factory=dict, description='per-model overrides of the manifest defaults, JSON: {"gan": {...}}')
    max_batch_size: int | None = Field(None, ge=1, le=4096, description="override for every model")
    max_delay_ms: float | None = Field(None, ge=0, le=1000, description="override for every model")
    batch_concurrency: int = Field(1, ge=1, le=16, description="ONNX Runtime calls in flight per graph")
    max_queue_items: int = Field(2048, ge=1, description="queued items per graph before 503")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a batched request before 504, from its "
                                     "arrival")
    max_queue_wait_s: float = Field(1.0, gt=0, description="a batched request whose queue ahead would take longer "
                                    "than this to compute is refused 503 at once")
    sample_timeout_s: float = Field(300.0, gt=0, description="deadline of a PixelCNN sample request")
    sampler_max_active: int = Field(64, ge=1, le=1024, description="PixelCNN sequences advanced per step")
    sampler_max_queue: int = Field(512, ge=1)
    sse_progress_interval_s: float = Field(0.25, gt=0, le=60, description="a streamed PixelCNN sample "
                                           "(Accept: text/event-stream) reports progress at most this often")
    sse_heartbeat_s: float = Field(15.0, gt=0, le=3600, description="an event stream with nothing to say for "
                                   "this long sends a comment line, so that proxies keep the connection")
    v2_max_batch: int = Field(256, ge=1, le=4096, description="items in one /v2 infer request (as /v1's n)")
    v2_max_output_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="a /v2 request's outputs as raw "
                                     "tensors at most this many bytes: caps the batch of graphs with big outputs")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request bodies above this get 413")
    max_inflight: int = Field(96, ge=1, le=100_000, description="POST requests in flight per path and process; "
                              "past it 503 + Retry-After at once, before the body is read")
    max_loop_lag_s: float = Field(0.1, gt=0, description="while the event loop runs this far behind, POST "
                                  "requests are refused 503 at once: the process is past its capacity")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection's request line and headers must arrive "
                                    "within this, counted from the connection or the request's first byte; else 408")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body must arrive within this after its "
                                  "headers; else 408")
    backlog: int = Field(4096, ge=1, description="the listening socket's accept queue (the kernel caps it at "
                         "net.core.somaxconn)")
    warmup: bool = Field(True, description="run every graph before reporting ready (see warmup_batch_sizes)")
    model_control: Literal["none", "explicit", "poll"] = Field(
        "explicit", description="none: the store is read once at start-up; explicit: also loaded and unloaded "
                                "through POST /v2/repository/models/{model}/load and /unload; poll: also "
                                "rescanned every poll_interval_s, changes applied as if requested")
    poll_interval_s: float = Field(15.0, gt=0, le=3600, description="how often poll mode rescans the store")
    control_dir: Path | None = Field(
        None, description="several workers: the folder through which a model change made through one worker "
                          "reaches the others (a desired-state file each watches); unset: `python -m service` "
                          "makes a private one. Wiped at every start; not used with one worker")
    control_wait_s: float = Field(2.0, ge=0, le=600, description="several workers: how long a model change's "
                                  "response waits for the other workers to apply it (it reports how many have)")
    version_policy: dict[str, VersionPolicy] = Field(
        default_factory=dict, description='per model, which versions serve, JSON in Triton\'s shapes: '
                                          '{"gan": {"latest": 2}, "vae": {"specific": [1, 3]}, "pixelcnn": "all"}; '
                                          'default "all"')
    traffic: dict[str, dict[int, float]] = Field(
        default_factory=dict, description='per model, how requests that name no version are split between '
                                          'versions, JSON weights: {"gan": {"1": 90, "2": 10}}; default: the highest')
    drain_grace_s: float = Field(2.0, ge=0, le=600, description="a version leaving service (unloaded, replaced, "
                                 "removed) still takes work this long, for requests that chose it just before; "
                                 "then what it accepted finishes and it is released")
    playground: bool = Field(True, description="serve the browser playground at /playground (its page and assets "
                                               "come from the package; nothing is fetched from other hosts)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    admin_token: SecretStr | None = Field(
        None, description="the bearer token of the admin routes (repository load and unload, traffic split); "
                          "unset: they answer 403")
    api_keys: Annotated[tuple[SecretStr, ...] | None, NoDecode] = Field(
        None, description="data-plane API keys, each sent as `Authorization: Bearer <key>` or `X-API-Key`: a JSON "
                          "list, or the path of a file with one key per line (blank lines and `#` comments left "
                          "out); unset: /v1 and /v2 need no key")

    @field_validator("admin_token")
    @classmethod
    def _admin_token_is_a_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None:
            _check_secret(token.get_secret_value(), "GENSERVE_ADMIN_TOKEN")
        return token

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys_from_list_or_file(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = read_api_keys(value)
        if isinstance(value, list | tuple):
            plain = [k.get_secret_value() if isinstance(k, SecretStr) else k for k in value]
            for i, key in enumerate(plain):
                if isinstance(key, str):
                    _check_secret(key, f"GENSERVE_API_KEYS key {i}")
            if not plain:  # unset means off: a list with no key is a mistake (an emptied secret?), not a way to open up
                raise ValueError("GENSERVE_API_KEYS holds no key: unset it to serve without API keys")
            return tuple(dict.fromkeys(plain))
        return value

    @model_validator(mode="after")
    def _admin_token_is_no_api_key(self) -> Settings:
        if self.admin_token is not None and self.api_keys is not None and \
                self.admin_token.get_secret_value() in {k.get_secret_value() for k in self.api_keys}:
            raise ValueError("GENSERVE_ADMIN_TOKEN is also one of GENSERVE_API_KEYS: every client holding that key "
                             "could change the models")
        return self

    def ort_threads(self) -> int:
        """Intra-op threads per session: as set, or the cores this process may use divided between the workers,
        so that N workers never run N x cores ONNX Runtime threads that preempt each other mid-operator."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, available_cores() // self.workers)

    def batching_for(self, model: str, max_batch_size: int, max_delay_ms: float) -> tuple[int, float]:
        """Manifest defaults, then the global override, then the per-model override."""
        mbs = self.max_batch_size or max_batch_size
        delay = self.max_delay_ms if self.max_delay_ms is not None else max_delay_ms
        if (o := self.batching.get(model)) is not None:
            mbs = o.max_batch_size or mbs
            delay = o.max_delay_ms if o.max_delay_ms is not None else delay
        return mbs, delay


@lru_cache
def get_settings() -> Settings:
    return Settings()
