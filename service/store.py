"""The model store: `<root>/<model>/<version>/manifest.json` plus the ONNX files it names.

Like a Triton model repository, every version folder carries a declarative manifest that is validated at
load: files present, sha256 checksums match, every graph loads in ONNX Runtime, and the tensors the graph
really has match the ones the manifest declares (name, dtype, shape; None = dynamic axis). A version that
fails is refused with every problem listed; the other versions and models still load.

Whatever the store holds, one bad entry refuses at most the version (or the model folder) it sits in, with one
log line naming its path and the reason, and everything else still loads:

- a model folder is a directory named like manifest.name (`[a-z][a-z0-9_-]*`); a directory named otherwise is
  refused, a file at the top is skipped with a warning;
- a version folder is named by a version number: ASCII digits without a leading zero, 1 to 999999999 (the
  largest a /v2 request can name). A name that is numeric but not such a number (`0`, `02`, `²`, `٣`) is
  refused; any other name (`latest`, `notes`) is skipped with a warning saying so; names starting with a dot
  (training's staging folders, editors' files) are skipped silently;
- a version folder, manifest or ONNX file whose real path (symlinks followed) leaves the store is refused, and
  only regular files are ever opened, so nothing can block a read (a FIFO) or read a device;
- manifest.json is at most MAX_MANIFEST_BYTES, checked before it is read, UTF-8, nested at most
  MAX_MANIFEST_DEPTH deep (checked before parsing: the parser recurses), standard JSON (no NaN or Infinity),
  and only values the service can send back in its own JSON answers (no lone surrogates, no integers past 64
  bits), or the version is refused.

Training writes manifests with the same pydantic models, so writer and reader cannot drift apart.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

Family = Literal["pixelcnn", "vae", "gan"]
DType = Literal["float32", "int64", "uint8"]

# the graphs the service needs from each family, and their declared inputs
REQUIRED_GRAPHS: dict[str, tuple[str, ...]] = {
    "pixelcnn": ("logprob", "vstack", "hrow"),
    "vae": ("encoder", "decoder"),
    "gan": ("generator",),
}
# The tensors (inputs or outputs) the service calls each graph's by, and the image tensors whose height and width
# must be fixed numbers: the families read a model's image geometry from them.
REQUIRED_TENSORS: dict[str, dict[str, tuple[str, ...]]] = {
    "pixelcnn": {"logprob": ("image", "label", "log_probs"), "vstack": ("image", "label", "vfeats"),
                 "hrow": ("image", "vfeats", "logits")},
    "vae": {"encoder": ("image", "mean", "logvar"), "decoder": ("z", "loc")},
    "gan": {"generator": ("z", "label", "image")},
}
# Graphs a version may add, which the service then uses; they come together, with these tensors: the PixelCNN's
# activation-cached sampler (service.sampler.CachedSteps).
OPTIONAL_GRAPHS: dict[str, dict[str, tuple[str, ...]]] = {
    "pixelcnn": {"vstep": ("image", "vcache", "label", "row", "vfeats", "vnew"),
                 "hstep": ("image", "hcache", "vfeats", "col", "logits", "hnew")},
}
FIXED_IMAGES: dict[str, tuple[str, str]] = {"pixelcnn": ("logprob", "image"), "vae": ("encoder", "image"),
                                            "gan": ("generator", "image")}


def declared_tensor(manifest: Manifest, graph: str, name: str) -> TensorSpec | None:
    """A graph's input or output as the manifest declares it; None if it declares none of that name."""
    spec = manifest.graphs[graph]
    return next((t for t in (*spec.inputs, *spec.outputs) if t.name == name), None)


def image_shape(manifest: Manifest) -> tuple[int, int]:
    """(height, width) of the family's images: its FIXED_IMAGES tensor, which a version is refused without."""
    height, width = declared_tensor(manifest, *FIXED_IMAGES[manifest.family]).shape[-2:]
    return height, width


def _tensor_problems(manifest: Manifest) -> list[str]:
    """What the manifest's graphs lack of the tensors the service relies on (the graphs themselves are there)."""
    problems = []
    optional = OPTIONAL_GRAPHS.get(manifest.family, {})
    present = {g: names for g, names in optional.items() if g in manifest.graphs}
    if present and len(present) < len(optional):
        problems.append(f"graphs {sorted(optional)} come together; this version has only {sorted(present)}")
    for gname, names in {**REQUIRED_TENSORS[manifest.family], **present}.items():
        if lacking := [n for n in names if declared_tensor(manifest, gname, n) is None]:
            problems.append(f"graph '{gname}' needs tensors {lacking}")
    if len(present) == len(optional) == 2 and not any(p.startswith("graph 'vstep'") or p.startswith(
            "graph 'hstep'") for p in problems):
        problems += _step_problems(manifest)
    gname, tname = FIXED_IMAGES[manifest.family]
    image = declared_tensor(manifest, gname, tname)
    if image is not None and (len(image.shape) < 3 or not all(isinstance(d, int) for d in image.shape[-2:])):
        problems.append(f"graph '{gname}' tensor '{tname}' needs a fixed height and width, got {image.shape}")
    return problems

def _step_problems(manifest: Manifest) -> list[str]:
    """The PixelCNN step graphs' caches and features must fit each other and the version's other graphs: vcache
    (B, depth, C, p, W) with fixed sizes, hcache (B, depth, C, 1, p), vnew (B, depth, C, n, W), and the vertical
    features (B, L, 2C, ...) of vstep, hstep and vstack alike, W the image width."""
    def shape(graph: str, name: str) -> list:
        return list(declared_tensor(manifest, graph, name).shape)

    cache = shape("vstep", "vcache")
    if len(cache) != 5 or not all(isinstance(d, int) and d > 0 for d in cache[1:]):
        return [f"graph 'vstep' tensor 'vcache' needs fixed layers, channels, rows and width "
                f"(batch, layers, channels, rows, width), got {cache}"]
    _, depth, channels, context, width = cache
    problems = []
    if width != image_shape(manifest)[1]:
        problems.append(f"graph 'vstep' tensor 'vcache' is {width} wide, the images {image_shape(manifest)[1]}")
    want = {("hstep", "hcache"): [depth, channels, 1, context], ("vstep", "vnew"): [depth, channels, None, width]}
    for (graph, name), dims in want.items():
        if shape(graph, name)[1:] != dims:
            shown = ", ".join("n" if d is None else str(d) for d in dims)
            problems.append(f"graph '{graph}' tensor '{name}' must be (batch, {shown}) to fit vstep's vcache "
                            f"{cache}, got {shape(graph, name)}")
    features = {graph: shape(graph, "vfeats")[1:3] for graph in ("vstack", "vstep", "hstep")}
    if len({tuple(f) for f in features.values()}) > 1:
        problems.append(f"the vertical features of vstack, vstep and hstep differ in layers and channels: "
                        f"{features}")
    return problems


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(uint8)": "uint8"}

MODEL_NAME = r"[a-z][a-z0-9_-]*"              # a model folder's name and manifest.name
MAX_VERSION = 999_999_999                     # /v2 names a version in at most 9 digits
MAX_MANIFEST_BYTES = 1 << 20                  # shipped manifests are a few KiB
MAX_MANIFEST_DEPTH = 32                       # shipped manifests nest 6 deep
MAX_PROBLEMS = 20                             # per refused version: enough to act on, a log line stays readable
MAX_PROBLEM_CHARS = 500

_VERSION_NAME = re.compile(r"[1-9][0-9]{0,8}")  # a str pattern's [0-9] is ASCII only, unlike str.isdigit()
_MODEL_NAME = re.compile(MODEL_NAME)
# JSON strings (whose brackets do not nest anything), then everything but brackets, are dropped to measure depth.
# Possessive, and an unclosed string runs to the end: a failed match restarted at every quote of a long run of
# escaped quotes would take quadratic time, hours for one crafted 1 MiB manifest.
_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


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


# Two tests share the anomaly verdict, each at alpha / 2, so the least p-value 1/(N+1) must be below 0.005 for /v1's
# default alpha of 0.01 to flag anything: N >= 200.
MIN_ANOMALY_REFERENCE = 200


class AnomalyReference(BaseModel):
    """What held-out digits the model never trained on scored, which calibrates p-values: an image's p-value is
    the share of these at least as extreme. Measured at export, so each version brings its own."""
    model_config = ConfigDict(extra="forbid")
    complexity: Literal["png-min-filter-zlib9"]  # how the scores' complexity term was measured (imaging.png_bits)
    source: str                                   # which images, in words
    scores: list[float] = Field(min_length=MIN_ANOMALY_REFERENCE)    # anomaly scores, bits, ascending
    nll_bits: list[float] = Field(min_length=MIN_ANOMALY_REFERENCE)  # -log2 p(x) of the same digits, ascending

    @field_validator("scores", "nll_bits")
    @classmethod
    def _ascending_finite(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(x) for x in v):
            raise ValueError("must be finite")
        if any(a > b for a, b in zip(v[:-1], v[1:], strict=True)):
            raise ValueError("must be in ascending order")
        return v

    @model_validator(mode="after")
    def _same_digits(self) -> AnomalyReference:
        if len(self.scores) != len(self.nll_bits):
            raise ValueError(f"scores ({len(self.scores)}) and nll_bits ({len(self.nll_bits)}) must describe the "
                             "same digits")
        return self


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1, 2] = 1  # 2 added `anomaly`, which readers of 1 refuse as an unknown field
    name: str = Field(pattern=f"^{MODEL_NAME}$")
    family: Family
    version: int = Field(ge=1, le=MAX_VERSION)
    description: str = ""
    created: str = ""
    files: dict[str, FileEntry]
    graphs: dict[str, GraphSpec]
    model: dict[str, Any] = {}          # constructor arguments of the network
    dataset: dict[str, Any] = {}
    training: dict[str, Any] = {}       # resolved training config and timings
    metrics: dict[str, Any] = {}        # held-out evaluation
    attributes: dict[str, AttributeDirection] = {}
    anomaly: AnomalyReference | None = None
    batching: BatchingDefaults = BatchingDefaults()

    @model_validator(mode="after")
    def _schema_knows_its_fields(self) -> Manifest:
        if self.anomaly is not None and self.schema_version < 2:
            raise ValueError("anomaly needs schema_version 2")
        return self


def printable(text: str) -> str:
    """text with what cannot be printed escaped: names on disk may hold control characters, and undecodable
    bytes (which Python keeps as lone surrogates) would make a log handler or the JSON encoder of /readyz fail."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def tidy(problems: list[str]) -> list[str]:
    """Problems as they are reported: printable, each of bounded length, at most MAX_PROBLEMS of them (a manifest
    can hold any number of wrong entries, and the list ends up in one log line and in API answers)."""
    out = [printable(p[:MAX_PROBLEM_CHARS] + ("..." if len(p) > MAX_PROBLEM_CHARS else "")) for p in problems]
    if len(out) > MAX_PROBLEMS:
        out = out[:MAX_PROBLEMS] + [f"... and {len(out) - MAX_PROBLEMS} more problems"]
    return out


class StoreError(Exception):
    """A version failed validation; `problems` lists everything found wrong, not just the first thing."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, tidy(problems)
        super().__init__(f"{printable(str(path))}: " + "; ".join(self.problems))


@dataclass
class LoadedVersion:
    manifest: Manifest
    path: Path
    sessions: dict[str, Any] = field(default_factory=dict)   # graph name -> onnxruntime.InferenceSession
    providers: list[str] = field(default_factory=list)       # providers the sessions actually run on


def open_regular(path: Path) -> BinaryIO:
    """path opened for reading, if it is a regular file; OSError otherwise. It is opened without blocking and
    checked once open: a FIFO put in its place after an earlier check would otherwise block until a writer came."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)


def _resolve(path: Path) -> Path:
    """path with every symlink followed; raises OSError or RuntimeError (a symlink loop, in Python 3.11) or
    ValueError (a NUL in the name)."""
    return path.resolve()


def outside(path: Path, root: Path) -> str | None:
    """Why `path` may not be used under the store `root` (already resolved), or None: its real path leaves the
    store, or cannot be worked out."""
    try:
        real = _resolve(path)
    except (OSError, RuntimeError, ValueError) as e:
        return f"its real path cannot be worked out: {e}"
    if not real.is_relative_to(root):
        return f"resolves outside the store (to {real})"
    return None


def regular_file(path: Path, root: Path, what: str) -> str | None:
    """Why `what` at `path` cannot be read as a file of the store, or None. Only a regular file inside the store
    qualifies: opening a FIFO would block, and a device or a file elsewhere is not the store's to serve."""
    if (why := outside(path, root)) is not None:
        return f"{what} {why}"
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{what} is missing"
    except (OSError, ValueError) as e:
        return f"{what} cannot be read: {e}"
    if not stat.S_ISREG(st.st_mode):
        return f"{what} is not a regular file"
    return None


def json_depth(text: str) -> int:
    """How deeply JSON text nests arrays and objects, measured without parsing it: json.loads recurses, so a
    deep enough document raises RecursionError (or worse, in C) before it could be refused."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _manifest_data(path: Path) -> Any:
    """The parsed content of a manifest file that regular_file() accepted; raises StoreError."""
    vdir = path.parent
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise StoreError(vdir, [f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes"])
        with open_regular(path) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)  # the file may have grown since stat()
    except OSError as e:
        raise StoreError(vdir, [f"manifest.json cannot be read: {e}"]) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise StoreError(vdir, [f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StoreError(vdir, [f"manifest.json is not UTF-8 text: {e}"]) from None
    if (depth := json_depth(text)) > MAX_MANIFEST_DEPTH:
        raise StoreError(vdir, [f"manifest.json nests {depth} levels deep, more than {MAX_MANIFEST_DEPTH}"])
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError, as are NaN and 5000-digit ints
        raise StoreError(vdir, [f"manifest.json is not valid JSON: {e}"]) from None
    try:  # what the service cannot encode would fail every answer that shows the manifest (/v1/models)
        orjson.dumps(data)
    except TypeError as e:
        raise StoreError(vdir, [f"manifest.json holds values the service cannot answer with: {e}"]) from None
    return data


def read_manifest(version_dir: Path) -> Manifest:
    """The validated manifest of a version folder `<root>/<model>/<version>`; raises StoreError."""
    path = version_dir / "manifest.json"
    root = version_dir.parent.parent.resolve()
    if (why := regular_file(path, root, "manifest.json")) is not None:
        raise StoreError(version_dir, [why])
    data = _manifest_data(path)
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        problems = [f"manifest.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise StoreError(version_dir, problems) from None


def write_manifest(manifest: Manifest, version_dir: Path) -> Path:
    """Write the version's manifest.json whole or not at all (a hidden file renamed over it): a server reading
    the store meanwhile sees the old manifest or the new one."""
    path = version_dir / "manifest.json"
    staged = path.with_name(".manifest.json.tmp")
    staged.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    os.replace(staged, path)
    return path


def ort_dtype(t: Any) -> str:
    """An onnxruntime NodeArg's element type in manifest terms ('tensor(float)' -> 'float32')."""
    return _ORT_DTYPES.get(t.type, t.type)


def ort_shape(t: Any) -> list[int | None]:
    """An onnxruntime NodeArg's shape with symbolic (dynamic) axes as None."""
    return [d if isinstance(d, int) else None for d in t.shape]


def session_tensor_specs(sess: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
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


def _check_file(path: Path, entry: FileEntry, root: Path, what: str) -> str | None:
    """Why a file the manifest lists cannot be trusted, or None: not a regular file in the store, unreadable, or
    not the bytes the manifest's checksum names."""
    if (why := regular_file(path, root, what)) is not None:
        return why
    try:
        digest = sha256_file(path)
    except OSError as e:
        return f"{what} cannot be read: {e}"
    if digest != entry.sha256:
        return f"{what} sha256 is {digest[:12]}..., manifest says {entry.sha256[:12]}..."
    return None


def validate_version(version_dir: Path, make_session=None) -> LoadedVersion:
    """Validate one version folder and open its graphs; raises StoreError listing every problem.

    make_session(path) -> InferenceSession is injected so the caller decides providers and options;
    without it, graphs are opened on the CPU provider.
    """
    root = version_dir.parent.parent.resolve()
    if (why := outside(version_dir, root)) is not None:
        raise StoreError(version_dir, [f"the version folder {why}"])
    manifest = read_manifest(version_dir)
    problems: list[str] = []
    if version_dir.name != str(manifest.version):
        problems.append(f"folder is '{version_dir.name}' but manifest.version is {manifest.version}")
    if version_dir.parent.name != manifest.name:
        problems.append(f"folder is under '{version_dir.parent.name}' but manifest.name is '{manifest.name}'")
    for name, entry in manifest.files.items():
        if (why := _check_file(version_dir / name, entry, root, f"file '{name}'")) is not None:
            problems.append(why)
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
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            problems.append(f"graph '{gname}' ({spec.file}) does not load: {first_line[:200]}")
            continue
        problems += [f"graph '{gname}': {p}" for p in _check_tensors("input", spec.inputs, sess.get_inputs())]
        problems += [f"graph '{gname}': {p}" for p in _check_tensors("output", spec.outputs, sess.get_outputs())]
        loaded.sessions[gname] = sess
        for p in sess.get_providers():
            if p not in loaded.providers:
                loaded.providers.append(p)
    problems += _tensor_problems(manifest)  # after the graphs: their own mismatches say more
    if problems:
        raise StoreError(version_dir, problems)
    return loaded


def _entries(folder: Path) -> list[Path]:
    """The entries of a folder, sorted, those starting with a dot left out (training stages a version in
    `.<version>-*`; editors and version control leave their own). Raises OSError."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # is_dir() swallows only some errors (a name too long, for one, escapes it)
        return False


def version_name_problem(name: str) -> str | None:
    """Why a folder name is not a version number, or None for one."""
    if _VERSION_NAME.fullmatch(name):
        return None
    return (f"'{name}' is not a version number: versions are named 1 to {MAX_VERSION} in ASCII digits without "
            f"a leading zero")


@dataclass
class Scan:
    """What the store's layout offers: the model folders (directories named like a model, whatever they hold),
    version folders to validate, and entries refused by their place alone."""
    folders: list[str] = field(default_factory=list)
    versions: list[Path] = field(default_factory=list)
    refused: dict[str, list[str]] = field(default_factory=dict)

    def refuse(self, path: Path, problems: list[str]) -> None:
        refuse(self.refused, path, problems)


def refuse(refused: dict[str, list[str]], path: Path, problems: list[str]) -> None:
    """Record a refused entry under its printable path, with its one log line. `problems` come from a StoreError
    (already tidy) or name one thing each, which may hold any name found on disk."""
    key, problems = printable(str(path)), [printable(p) for p in problems]
    refused[key] = problems
    log.error("model store: refusing %s: %s", key, "; ".join(problems))


def _skip(path: Path, why: str) -> None:
    log.warning("model store: skipping %s: %s", printable(str(path)), printable(why))


def _scan_model(model_dir: Path, root: Path, scan: Scan) -> None:
    try:
        entries = _entries(model_dir)
    except OSError as e:
        scan.refuse(model_dir, [f"the model folder cannot be listed: {e}"])
        return
    found = []
    for vdir in entries:
        name = vdir.name
        if (why := version_name_problem(name)) is not None:
            if name == "latest":
                _skip(vdir, "'latest' is not a version number; the highest valid version serves by default")
            elif name.isnumeric():  # meant as a version ('02', '0', '²'): listed as refused so that it shows
                scan.refuse(vdir, [why])
            else:
                _skip(vdir, f"not a version folder ({why})")
        elif (why := outside(vdir, root)) is not None:
            scan.refuse(vdir, [f"the version folder {why}"])
        elif not is_dir(vdir):
            scan.refuse(vdir, ["a version must be a folder, and this is not one"])
        else:
            found.append(vdir)
    scan.versions += sorted(found, key=lambda p: int(p.name))


def scan_store(root: Path) -> Scan:
    """Walk `<root>/<model>/<version>/`: the version folders to validate, sorted by model and version, and what
    the layout alone refuses. Every entry left out is logged once, except names starting with a dot."""
    scan = Scan()
    try:
        real_root = root.resolve()
        entries = _entries(root)
    except (OSError, RuntimeError) as e:
        log.error("model store: cannot list %s: %s", printable(str(root)), e)
        return scan
    for model_dir in entries:
        if not is_dir(model_dir):
            _skip(model_dir, "not a folder, so not a model")
        elif not _MODEL_NAME.fullmatch(model_dir.name):
            scan.refuse(model_dir, [f"'{model_dir.name}' is not a valid model name ({MODEL_NAME})"])
        else:
            scan.folders.append(model_dir.name)  # one even if refused below: a model that cannot serve
            if (why := outside(model_dir, real_root)) is not None:
                scan.refuse(model_dir, [f"the model folder {why}"])
            else:
                _scan_model(model_dir, real_root, scan)
    return scan


def scan_model(root: Path, name: str) -> Scan | None:
    """One model folder of the store, as scan_store() would find it; None when there is no such folder."""
    scan = Scan()
    model_dir = root / name
    if not _MODEL_NAME.fullmatch(name) or not is_dir(model_dir):
        return None
    scan.folders.append(name)
    if (why := outside(model_dir, root.resolve())) is not None:
        scan.refuse(model_dir, [f"the model folder {why}"])
    else:
        _scan_model(model_dir, root.resolve(), scan)
    return scan


def discover(root: Path) -> list[Path]:
    """Every `<root>/<model>/<version>/` folder whose name is a version number, sorted by model and version."""
    return scan_store(root).versions


def load_store(root: Path, make_session=None) -> tuple[dict[str, dict[int, LoadedVersion]], dict[str, list[str]]]:
    """Load every valid version under root. Returns (models[name][version], refused[path] = problems).

    Never raises for what the store holds: each entry is loaded or refused (or skipped) on its own."""
    scan = scan_store(root)
    return load_versions(scan, make_session), scan.refused


def load_versions(scan: Scan, make_session=None) -> dict[str, dict[int, LoadedVersion]]:
    """Validate and open every version folder of a scan: models[name][version]. One that fails joins
    scan.refused; never raises for what the store holds."""
    models: dict[str, dict[int, LoadedVersion]] = {}
    for vdir in scan.versions:
        try:
            lv = validate_version(vdir, make_session)
        except StoreError as e:
            scan.refuse(vdir, e.problems)
            continue
        except Exception as e:  # a case no check foresaw still refuses this version only
            scan.refuse(vdir, [f"validation failed unexpectedly: {type(e).__name__}: {e}"])
            log.debug("model store: %s failed validation", vdir, exc_info=True)
            continue
        models.setdefault(lv.manifest.name, {})[lv.manifest.version] = lv
        log.info("model store: loaded %s v%d (%s) on %s", lv.manifest.name, lv.manifest.version,
                 lv.manifest.family, ",".join(lv.providers))
    return models
