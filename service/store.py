"""The model store: `<root>/<model>/<version>/manifest.json` plus the ONNX files it names.

Like a Triton model repository, every version folder carries a declarative manifest that is validated at
load: files present, sha256 checksums match, every graph loads in ONNX Runtime, and the tensors the graph
really has match the ones the manifest declares (name, dtype, shape; None = dynamic axis). A version that
fails is refused with every problem listed; the other versions and models still load.

Training writes manifests with the same pydantic models, so writer and reader cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

Family = Literal["pixelcnn", "vae", "gan"]
DType = Literal["float32", "int64", "uint8"]

# the graphs the service needs from each family, and their declared inputs
REQUIRED_GRAPHS: dict[str, tuple[str, ...]] = {
    "pixelcnn": ("logprob", "vstack", "hrow"),
    "vae": ("encoder", "decoder"),
    "gan": ("generator",),
}

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(uint8)": "uint8"}


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    dtype: DType
    shape: list[int | None]  # None marks a dynamic axis (always the batch axis, sometimes height)


class GraphSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class BatchingDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(64, ge=1, le=4096)
    max_delay_ms: float = Field(0.0, ge=0.0, le=1000.0)


class AttributeDirection(BaseModel):
    """A latent direction: z + s * direction moves the decoded attribute by about s standard deviations."""
    model_config = ConfigDict(extra="forbid")
    description: str
    unit: str
    mean: float           # of the attribute on the training set, in `unit`
    std: float = Field(gt=0)
    direction: list[float]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    family: Family
    version: int = Field(ge=1)
    description: str = ""
    created: str = ""
    files: dict[str, FileEntry]
    graphs: dict[str, GraphSpec]
    model: dict[str, Any] = {}          # constructor arguments of the network
    dataset: dict[str, Any] = {}
    training: dict[str, Any] = {}       # resolved training config and timings
    metrics: dict[str, Any] = {}        # held-out evaluation
    attributes: dict[str, AttributeDirection] = {}
    batching: BatchingDefaults = BatchingDefaults()


class StoreError(Exception):
    """A version failed validation; `problems` lists everything found wrong, not just the first thing."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, problems
        super().__init__(f"{path}: " + "; ".join(problems))


@dataclass
class LoadedVersion:
    manifest: Manifest
    path: Path
    sessions: dict[str, Any] = field(default_factory=dict)   # graph name -> onnxruntime.InferenceSession
    providers: list[str] = field(default_factory=list)       # providers the sessions actually run on


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)


def read_manifest(version_dir: Path) -> Manifest:
    path = version_dir / "manifest.json"
    if not path.is_file():
        raise StoreError(version_dir, ["manifest.json is missing"])
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise StoreError(version_dir, [f"manifest.json is not valid JSON: {e}"]) from None
    except ValidationError as e:
        problems = [f"manifest.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise StoreError(version_dir, problems) from None


def write_manifest(manifest: Manifest, version_dir: Path) -> Path:
    path = version_dir / "manifest.json"
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path


def ort_dtype(t: Any) -> str:
    """An onnxruntime NodeArg's element type in manifest terms ('tensor(float)' -> 'float32')."""
    return _ORT_DTYPES.get(t.type, t.type)


def ort_shape(t: Any) -> list[int | None]:
    """An onnxruntime NodeArg's shape with symbolic (dynamic) axes as None."""
    return [d if isinstance(d, int) else None for d in t.shape]


def graph_tensors(sess: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """What an InferenceSession really takes and returns, as manifest tensor specs (inputs, outputs)."""
    def specs(ts):
        return [TensorSpec(name=t.name, dtype=ort_dtype(t), shape=ort_shape(t)) for t in ts]
    return specs(sess.get_inputs()), specs(sess.get_outputs())


def _check_tensors(kind: str, declared: list[TensorSpec], actual: list[Any]) -> list[str]:
    problems = []
    real = {t.name: t for t in actual}
    for spec in declared:
        t = real.get(spec.name)
        if t is None:
            problems.append(f"declared {kind} '{spec.name}' is not in the graph (graph has {sorted(real)})")
            continue
        dtype = ort_dtype(t)
        if dtype != spec.dtype:
            problems.append(f"{kind} '{spec.name}' has dtype {dtype}, manifest says {spec.dtype}")
        shape = ort_shape(t)
        if shape != spec.shape:
            problems.append(f"{kind} '{spec.name}' has shape {shape}, manifest says {spec.shape}")
    undeclared = sorted(set(real) - {s.name for s in declared})
    if undeclared and kind == "input":
        problems.append(f"graph inputs {undeclared} are not declared in the manifest")
    return problems


def validate_version(version_dir: Path, make_session=None) -> LoadedVersion:
    """Validate one version folder and open its graphs; raises StoreError listing every problem.

    make_session(path) -> InferenceSession is injected so the caller decides providers and options;
    without it, graphs are opened on the CPU provider.
    """
    manifest = read_manifest(version_dir)
    problems: list[str] = []
    if version_dir.name != str(manifest.version):
        problems.append(f"folder is '{version_dir.name}' but manifest.version is {manifest.version}")
    if version_dir.parent.name != manifest.name:
        problems.append(f"folder is under '{version_dir.parent.name}' but manifest.name is '{manifest.name}'")
    for name, entry in manifest.files.items():
        path = version_dir / name
        if not path.is_file():
            problems.append(f"file '{name}' is missing")
        elif (digest := sha256_file(path)) != entry.sha256:
            problems.append(f"file '{name}' sha256 is {digest[:12]}..., manifest says {entry.sha256[:12]}...")
    missing = [g for g in REQUIRED_GRAPHS[manifest.family] if g not in manifest.graphs]
    if missing:
        problems.append(f"family '{manifest.family}' needs graphs {missing}")
    for gname, spec in manifest.graphs.items():
        if spec.file not in manifest.files:
            problems.append(f"graph '{gname}' file '{spec.file}' is not listed in manifest.files")
    if problems:  # do not open graphs whose bytes we cannot trust
        raise StoreError(version_dir, problems)

    if make_session is None:
        import onnxruntime as ort

        def make_session(path: Path):
            return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    loaded = LoadedVersion(manifest=manifest, path=version_dir)
    for gname, spec in manifest.graphs.items():
        try:
            sess = make_session(version_dir / spec.file)
        except Exception as e:  # onnxruntime raises several exception types for a bad graph
            problems.append(f"graph '{gname}' ({spec.file}) does not load: {str(e).splitlines()[0][:200]}")
            continue
        problems += [f"graph '{gname}': {p}" for p in _check_tensors("input", spec.inputs, sess.get_inputs())]
        problems += [f"graph '{gname}': {p}" for p in _check_tensors("output", spec.outputs, sess.get_outputs())]
        loaded.sessions[gname] = sess
        for p in sess.get_providers():
            if p not in loaded.providers:
                loaded.providers.append(p)
    if problems:
        raise StoreError(version_dir, problems)
    return loaded


def discover(root: Path) -> list[Path]:
    """Every `<root>/<model>/<version>/` folder whose version is an integer, sorted."""
    found = []
    if not root.is_dir():
        return found
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for vdir in model_dir.iterdir():
            if vdir.is_dir() and vdir.name.isdigit():
                found.append(vdir)
    return sorted(found, key=lambda p: (p.parent.name, int(p.name)))


def load_store(root: Path, make_session=None) -> tuple[dict[str, dict[int, LoadedVersion]], dict[str, list[str]]]:
    """Load every valid version under root. Returns (models[name][version], refused[path] = problems)."""
    models: dict[str, dict[int, LoadedVersion]] = {}
    refused: dict[str, list[str]] = {}
    for vdir in discover(root):
        try:
            lv = validate_version(vdir, make_session)
        except StoreError as e:
            refused[str(vdir)] = e.problems
            log.error("model store: refusing %s: %s", vdir, "; ".join(e.problems))
            continue
        models.setdefault(lv.manifest.name, {})[lv.manifest.version] = lv
        log.info("model store: loaded %s v%d (%s) on %s", lv.manifest.name, lv.manifest.version,
                 lv.manifest.family, ",".join(lv.providers))
    return models, refused
