"""Image codec for the API: request images in, generated images out.

Everything here works on 28x28 8-bit grayscale images (MNIST format). It uses numpy, Pillow (decoding) and the
standard library (encoding: zlib) only, so it can be used and tested without the web stack.

Input (``decode_image``): an image is either

* a base64-encoded PNG string, optionally with a ``data:image/png;base64,`` prefix. ASCII whitespace
  (for example line breaks from MIME-style wrapping) is ignored. The PNG must be exactly 28x28.
  8-bit grayscale (mode ``L``) is used as-is; other PNG modes are converted to 8-bit grayscale:
  RGB and palette images via Pillow's ITU-R 601-2 luma conversion, 16-bit grayscale (``I;16``/``I``) by
  scaling 0..65535 to 0..255, bilevel (``1``) to 0/255. Images with an alpha channel (``LA``, ``RGBA``,
  ``PA``, or a ``tRNS`` transparency entry) are composited onto a **black** background, which is the
  MNIST background, so a transparent pixel becomes 0.
* a 28x28 nested list of ints in 0..255 (row-major: ``value[row][col]``). Entries must be real ints:
  floats (even ``3.0``), bools and strings are rejected.

Every problem raises ``ImageDecodeError`` carrying the request field it came from (``"images[3]"``) and a
human-readable message, so the API layer can turn it into a 422 that points at the bad item.

Output: ``encode_png_b64`` writes an 8-bit grayscale PNG with zlib level 1 (28x28 images are tiny, so a
stronger level buys a few bytes at several times the cost) and returns plain base64 without a ``data:``
prefix; ``encode_images`` does that for a batch, or returns nested int lists for ``fmt="array"``.

Complexity (``png_bits``): the length of an image's smallest PNG, a general-purpose lossless compressor's
measure of how much there is to say about it (the input-complexity estimate of Serra et al., 2020).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_SIZE",
    "MAX_PNG_BYTES",
    "ImageDecodeError",
    "decode_image",
    "decode_images",
    "encode_images",
    "encode_png_b64",
    "png_bits",
    "to_uint8",
]

IMAGE_SIZE = 28
_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A 28x28 PNG, even RGBA 16-bit with no compression, is well under 10 KiB; anything far bigger is junk
# (or ancillary chunks used to make the server work), so refuse it before handing it to the decoder.
MAX_PNG_BYTES = 256 * 1024
_MAX_B64_CHARS = (MAX_PNG_BYTES // 3 + 1) * 4
_DATA_URI_PNG_PREFIX = "data:image/png;base64,"
_OUTPUT_FORMATS = ("png", "array")
_ASCII_WHITESPACE = " \t\r\n\f\v"
_WHITESPACE_TABLE = str.maketrans("", "", _ASCII_WHITESPACE)
_INT_TYPES = frozenset({int})


class ImageDecodeError(ValueError):
    """A request image could not be decoded. ``field`` names where it came from, e.g. ``"images[3]"``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------------------------- decode


def decode_image(value: object, field: str, size: tuple[int, int] = _SHAPE) -> np.ndarray:
    """Decode one request image (base64 PNG string or nested int list) of `size` (height, width), by default
    28x28, to a (height, width) uint8 array."""
    if isinstance(value, str):
        return _decode_png_b64(value, field, size)
    if isinstance(value, list):
        return _decode_array(value, field, size)
    raise ImageDecodeError(
        field,
        f"expected a base64-encoded PNG string or a {_words(size)} list of ints, got {_type_name(value)}",
    )


def decode_images(values: list, field: str = "images", size: tuple[int, int] = _SHAPE) -> np.ndarray:
    """Decode a list of request images of `size` (height, width) to an (N, height, width) uint8 array; errors
    name ``f"{field}[i]"``."""
    if not isinstance(values, list):
        raise ImageDecodeError(field, f"expected a list of images, got {_type_name(values)}")
    n = len(values)
    out = np.empty((n, *size), dtype=np.uint8)
    if n == 0:
        return out
    for i, value in enumerate(values):
        out[i] = decode_image(value, f"{field}[{i}]", size)
    return out


def _words(size: tuple[int, int]) -> str:
    """(height, width) as an error message says it: width x height, the way image sizes are written."""
    return f"{size[1]}x{size[0]}"


def _decode_array(value: list, field: str, size: tuple[int, int]) -> np.ndarray:
    # Check structure and element types with C-level loops (len/map/type), then build the array with an
    # explicit dtype (faster than letting numpy infer it). The explicit type check is what catches bools:
    # np.asarray([True, 2]) would silently give ints.
    height, width = size
    if len(value) != height or not all(type(row) is list and len(row) == width for row in value):
        raise ImageDecodeError(field, f"expected a {_words(size)} array, got {_describe_shape(value, size)}")
    types: set[type] = set()
    for row in value:
        types.update(map(type, row))
    if types - _INT_TYPES:
        bad = [t for t in types if t not in _INT_TYPES]
        if any(t is list or t is tuple for t in bad):
            raise ImageDecodeError(field, f"expected a {_words(size)} array, got {_describe_shape(value, size)}")
        if not all(issubclass(t, (int, np.integer)) and t is not bool for t in bad):
            raise ImageDecodeError(field, f"array entries must be ints in 0..255, got {_describe_types(bad)}")
    try:
        arr = np.array(value, dtype=np.int64)
    except OverflowError:  # a Python int beyond int64: certainly out of range
        found = _first_out_of_range(value)
        raise ImageDecodeError(field, f"array values must be in 0..255, got {found}") from None
    lo = arr.min()
    hi = arr.max()
    if lo < 0 or hi > 255:
        bad_value = hi if hi > 255 else lo
        r, c = np.argwhere(arr == bad_value)[0]
        raise ImageDecodeError(field, f"array values must be in 0..255, got {int(bad_value)} at [{r}][{c}]")
    return arr.astype(np.uint8)


def _describe_types(types: list[type]) -> str:
    names = {bool: "booleans", float: "floats", str: "strings", type(None): "nulls", dict: "objects"}
    return ", ".join(sorted(names.get(t, f"values of type {t.__name__}") for t in types))


def _describe_shape(value: list, size: tuple[int, int]) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is not None and arr.dtype != object:
        return "shape " + ("x".join(str(d) for d in arr.shape) if arr.ndim else "scalar")
    if len(value) != size[0]:
        return f"a nested list with {len(value)} rows"
    for r, row in enumerate(value):
        if not isinstance(row, list):
            return f"a non-list row at [{r}] ({_type_name(row)})"
        if len(row) != size[1]:
            return f"a ragged nested list (row {r} has {len(row)} entries)"
    return "a ragged nested list"


def _first_out_of_range(value: list) -> str:
    for r, row in enumerate(value):
        for c, v in enumerate(row):
            if not 0 <= v <= 255:
                return f"{v} at [{r}][{c}]"
    return "an out-of-range value"  # pragma: no cover - only called when one exists


def _decode_png_b64(value: str, field: str, size: tuple[int, int]) -> np.ndarray:
    text = value
    if text[:5].lower() == "data:":
        if text[: len(_DATA_URI_PNG_PREFIX)].lower() != _DATA_URI_PNG_PREFIX:
            media = text[5 : text.find(",")] if "," in text else text[5:40]
            raise ImageDecodeError(
                field, f"only data:image/png;base64 data URIs are supported, got data:{media[:40]}"
            )
        text = text[len(_DATA_URI_PNG_PREFIX) :]
    if any(ch in text for ch in _ASCII_WHITESPACE):
        text = text.translate(_WHITESPACE_TABLE)
    if not text:
        raise ImageDecodeError(field, "empty image string")
    if len(text) > _MAX_B64_CHARS:
        raise ImageDecodeError(field, f"encoded image is too large (limit {MAX_PNG_BYTES} bytes of PNG)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(field, "invalid base64") from None
    if not data.startswith(PNG_SIGNATURE):
        raise ImageDecodeError(field, "not a PNG image (bad signature); only PNG is accepted")
    # The first chunk of a PNG must be IHDR (signature, 4-byte length, b"IHDR", width, height): read the
    # size from it so a wrong-size image gets a clear message before Pillow (and its decompression-bomb
    # checks) sees it.
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageDecodeError(field, "not a decodable PNG image (missing IHDR header)")
    width, height = struct.unpack(">II", data[16:24])
    if (height, width) != size:
        raise ImageDecodeError(field, f"expected {_words(size)}, got {width}x{height}")
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
            # Image.open only parses the header: check the size before decoding any pixel data, so a
            # huge (decompression bomb) PNG is refused cheaply.
            if im.size[::-1] != size:
                raise ImageDecodeError(field, f"expected {_words(size)}, got {im.size[0]}x{im.size[1]}")
            im.load()
            return _to_gray8(im)
    except ImageDecodeError:
        raise
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, zlib.error...)
        raise ImageDecodeError(field, f"not a decodable PNG image ({type(exc).__name__})") from None


def _to_gray8(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "L" and "transparency" not in im.info:
        return np.array(im, dtype=np.uint8)
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit grayscale (Pillow opens it as I;16, older versions as I): Pillow's convert("L") clips at
        # 255 instead of scaling, so scale 0..65535 -> 0..255 ourselves.
        arr16 = np.clip(np.asarray(im).astype(np.float64), 0, 65535)
        if "transparency" in im.info:
            arr16 = np.where(arr16 == im.info["transparency"], 0.0, arr16)
        return np.rint(arr16 / 257.0).astype(np.uint8)
    if mode in ("LA", "RGBA", "PA", "La", "RGBa") or "transparency" in im.info:
        la = np.asarray(im.convert("LA"), dtype=np.uint16)
        # Composite onto black (the MNIST background): L * alpha / 255, rounded.
        return ((la[..., 0] * la[..., 1] + 127) // 255).astype(np.uint8)
    return np.array(im.convert("L"), dtype=np.uint8)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return type(value).__name__


# --------------------------------------------------------------------------------------------- encode


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data (PNG spec, section 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = _png_chunk(b"IEND", b"")


def _encode_png_batch(arr: np.ndarray) -> list[str]:
    """(N, H, W) uint8 -> N base64 PNGs: 8-bit grayscale, no interlace, filter type 0 on every scanline.

    Written with zlib directly, not through a PNG library: for an image this small, pypng's and Pillow's cost is
    almost all per-image Python set-up, several times what deflate takes (figures in docs/benchmarks.md).
    tests/unit/test_imaging.py decodes the output with Pillow and checks every chunk's CRC."""
    return [base64.b64encode(png).decode("ascii") for png in _pngs(arr, 0, 1)]


_PNG_FILTERS = ("none", "sub", "up", "average", "paeth")  # PNG spec, section 9.2; the index is the type byte


def _filtered(arr: np.ndarray, kind: int) -> np.ndarray:
    """(N, H, W) uint8 -> the same images with PNG filter `kind` applied to every scanline (one byte per pixel:
    `a` is the pixel to the left, `b` the one above, `c` above-left, 0 outside the image)."""
    x = arr.astype(np.int16)
    a, b, c = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    a[:, :, 1:], b[:, 1:, :], c[:, 1:, 1:] = x[:, :, :-1], x[:, :-1, :], x[:, :-1, :-1]
    if kind == 0:
        predicted = np.zeros_like(x)
    elif kind == 1:
        predicted = a
    elif kind == 2:
        predicted = b
    elif kind == 3:
        predicted = (a + b) // 2
    else:
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        predicted = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return ((x - predicted) % 256).astype(np.uint8)


def _pngs(arr: np.ndarray, kind: int, level: int) -> list[bytes]:
    """(N, H, W) uint8 -> N PNG files: 8-bit grayscale, no interlace, filter `kind` on every scanline."""
    n, h, w = arr.shape
    if h == 0 or w == 0:
        raise ValueError(f"a PNG needs at least one row and one column, got {h}x{w}")
    header = _PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    scanlines = np.empty((n, h, w + 1), np.uint8)  # each row starts with its filter type
    scanlines[:, :, 0] = kind
    scanlines[:, :, 1:] = _filtered(arr, kind) if kind else arr
    return [header + _png_chunk(b"IDAT", zlib.compress(image, level)) + _PNG_IEND for image in scanlines]


def png_bits(imgs: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N,) int64: the length in bits of each image's smallest PNG among the five filter
    types, each applied to every scanline, deflated at zlib level 9. A function of the pixels alone (the PNG a
    client sent is not measured): the service and the export that calibrates it measure the same way."""
    arr = np.asarray(imgs)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an (N, H, W) uint8 batch, got shape {arr.shape} dtype {arr.dtype}")
    sizes = [[len(png) for png in _pngs(arr, kind, 9)] for kind in range(len(_PNG_FILTERS))]
    return 8 * np.min(np.array(sizes, dtype=np.int64), axis=0)


def encode_png_b64(img: np.ndarray) -> str:
    """Encode a 2-D uint8 image (normally 28x28) as an 8-bit grayscale PNG, base64, no ``data:`` prefix."""
    arr = np.asarray(img)
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got shape {arr.shape} dtype {arr.dtype}")
    return _encode_png_batch(arr[None])[0]


def encode_images(imgs: np.ndarray, fmt: str) -> list:
    """Encode an (N, 28, 28) uint8 batch: ``"png"`` -> list of base64 PNG strings, ``"array"`` -> nested
    int lists (``imgs.tolist()``)."""
    arr = np.asarray(imgs)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an (N, H, W) uint8 batch, got shape {arr.shape} dtype {arr.dtype}")
    if fmt == "png":
        return _encode_png_batch(arr)
    if fmt == "array":
        return arr.tolist()
    raise ValueError(f"unknown image format {fmt!r}; expected one of {_OUTPUT_FORMATS}")


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float pixel values on the 0..255 scale (any shape) -> uint8: rounded half-to-even, clipped to 0..255.

    NaN maps to 0, +inf to 255, -inf to 0. Integer input is clipped; uint8 input is returned unchanged.
    Model outputs in 0..1 must be scaled by 255 by the caller first.
    """
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind in "biu":
        return np.clip(arr, 0, 255).astype(np.uint8)
    # fmax/fmin return the non-NaN operand, so NaN -> 0 with no separate nan_to_num pass; +-inf clip to 255/0.
    # Three ufuncs in the input's own precision, several times faster than a detour through float64.
    return np.fmin(np.fmax(np.rint(arr), 0.0), 255.0).astype(np.uint8)
