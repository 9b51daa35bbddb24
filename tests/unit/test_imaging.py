"""Unit tests for service.imaging: the request/response image codec."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.imaging import (
    ImageDecodeError,
    decode_image,
    decode_images,
    encode_images,
    encode_png_b64,
    to_uint8,
)


@pytest.fixture
def img() -> np.ndarray:
    rng = np.random.default_rng(1234)
    a = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    a[0, 0], a[0, 1] = 0, 255  # make sure both extremes are present
    return a


def png_b64(im: Image.Image, **save_kwargs) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save_kwargs)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def expect_error(value: object, field: str, *fragments: str) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(value, field)
    err = info.value
    assert err.field == field
    assert field in str(err)
    for fragment in fragments:
        assert fragment in err.message, err.message
    return err


# ------------------------------------------------------------------------------------------ round trips


def test_png_round_trip(img):
    s = encode_png_b64(img)
    assert isinstance(s, str) and not s.startswith("data:")
    raw = base64.b64decode(s)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(raw)) as im:
        assert im.mode == "L" and im.size == (28, 28)
    out = decode_image(s, "images[0]")
    assert out.dtype == np.uint8 and out.shape == (28, 28)
    np.testing.assert_array_equal(out, img)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, asserting each one's CRC-32 (Pillow's decoder does not check IDAT's)."""
    out, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        out.append((kind, data))
        pos += 12 + length
    return out


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 500), (500, 3), (28, 28)])
def test_png_any_shape_decodes_with_valid_chunks(shape):
    a = np.random.default_rng(sum(shape)).integers(0, 256, size=(2, *shape), dtype=np.uint8)
    for s, expected in zip(encode_images(a, "png"), a, strict=True):
        raw = base64.b64decode(s)
        assert [kind for kind, _ in _chunks(raw)] == [b"IHDR", b"IDAT", b"IEND"]
        with Image.open(io.BytesIO(raw)) as im:
            assert im.mode == "L" and im.size == (shape[1], shape[0])  # width first
            np.testing.assert_array_equal(np.asarray(im), expected)
    with pytest.raises(ValueError, match="one row and one column"):
        encode_images(np.zeros((1, 0, 5), np.uint8), "png")
    assert encode_images(np.zeros((0, *shape), np.uint8), "png") == []


def test_data_uri_prefix(img):
    s = encode_png_b64(img)
    np.testing.assert_array_equal(decode_image("data:image/png;base64," + s, "x"), img)
    np.testing.assert_array_equal(decode_image("DATA:image/PNG;base64," + s, "x"), img)


def test_base64_with_line_breaks(img):
    s = encode_png_b64(img)
    wrapped = "\n".join(s[i : i + 76] for i in range(0, len(s), 76)) + "\n"
    np.testing.assert_array_equal(decode_image(wrapped, "x"), img)


def test_array_input(img):
    out = decode_image(img.tolist(), "images[2]")
    assert out.dtype == np.uint8 and out.shape == (28, 28)
    np.testing.assert_array_equal(out, img)


def test_array_extremes():
    value = [[0] * 28 for _ in range(28)]
    value[27][27] = 255
    out = decode_image(value, "x")
    assert out[27, 27] == 255 and out.sum() == 255


def test_decode_images_mixed_batch(img):
    values = [encode_png_b64(img), img.tolist(), "data:image/png;base64," + encode_png_b64(255 - img)]
    out = decode_images(values)
    assert out.shape == (3, 28, 28) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], img)
    np.testing.assert_array_equal(out[1], img)
    np.testing.assert_array_equal(out[2], 255 - img)


def test_decode_images_empty():
    out = decode_images([])
    assert out.shape == (0, 28, 28) and out.dtype == np.uint8


def test_decode_images_names_the_bad_item(img):
    bad = img.tolist()
    bad[4][5] = 256
    with pytest.raises(ImageDecodeError) as info:
        decode_images([img.tolist(), encode_png_b64(img), bad])
    assert info.value.field == "images[2]"
    assert "256" in info.value.message and "[4][5]" in info.value.message


def test_decode_images_custom_field_and_not_a_list():
    with pytest.raises(ImageDecodeError) as info:
        decode_images([123], field="inputs")
    assert info.value.field == "inputs[0]"
    with pytest.raises(ImageDecodeError) as info:
        decode_images("abc")  # type: ignore[arg-type]
    assert info.value.field == "images"


# ------------------------------------------------------------------------------------------ PNG modes


def test_rgb_png_converted_to_gray(img):
    rgb = np.stack([img, img, img], axis=-1)
    out = decode_image(png_b64(Image.fromarray(rgb)), "x")
    np.testing.assert_array_equal(out, img)  # equal channels -> luma is the same value


def test_rgb_png_uses_luma():
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red: ITU-R 601-2 luma = 0.299 * 255 ~ 76
    out = decode_image(png_b64(Image.fromarray(rgb)), "x")
    assert abs(int(out[0, 0]) - 76) <= 1
    assert (out == out[0, 0]).all()


def test_rgba_png_composited_on_black(img):
    rgba = np.stack([img, img, img, np.full_like(img, 255)], axis=-1)
    rgba[0, :, 3] = 0  # first row fully transparent
    out = decode_image(png_b64(Image.fromarray(rgba)), "x")
    np.testing.assert_array_equal(out[1:], img[1:])
    assert (out[0] == 0).all()


def test_la_png(img):
    la = np.stack([img, np.full_like(img, 255)], axis=-1)
    out = decode_image(png_b64(Image.fromarray(la, mode="LA")), "x")
    np.testing.assert_array_equal(out, img)


def test_palette_png(img):
    pal = Image.fromarray(img).convert("P")
    assert pal.mode == "P"
    out = decode_image(png_b64(pal), "x")
    np.testing.assert_array_equal(out, np.asarray(pal.convert("L")))


def test_16bit_png_scaled_not_clipped():
    a16 = np.full((28, 28), 65535, dtype=np.uint16)
    a16[0, 0] = 0
    a16[0, 1] = 257 * 100
    im = Image.fromarray(a16)
    assert im.mode.startswith("I;16")
    out = decode_image(png_b64(im), "x")
    assert out[0, 0] == 0 and out[0, 1] == 100 and out[27, 27] == 255


def test_bilevel_png():
    a = np.zeros((28, 28), dtype=bool)
    a[3, 3] = True
    out = decode_image(png_b64(Image.fromarray(a)), "x")
    assert out[3, 3] == 255 and out.sum() == 255


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("value", [None, 12, 1.5, {"png": "x"}, (1, 2), b"\x89PNG"])
def test_wrong_type(value):
    expect_error(value, "images[3]", "expected a base64-encoded PNG string or a 28x28 list")


def test_bad_base64():
    expect_error("not base64!!", "images[1]", "invalid base64")
    expect_error("abc", "images[1]", "invalid base64")  # bad padding


def test_empty_string():
    expect_error("", "images[0]", "empty")
    expect_error("data:image/png;base64,", "images[0]", "empty")


def test_non_png_data_uri(img):
    expect_error("data:image/jpeg;base64," + encode_png_b64(img), "images[0]", "data:image/jpeg")


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "GIF"])
def test_other_image_formats_rejected(img, fmt):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    expect_error(base64.b64encode(buf.getvalue()).decode(), "images[5]", "not a PNG")


def test_random_bytes_rejected():
    expect_error(base64.b64encode(b"hello world, not an image").decode(), "images[0]", "not a PNG")


def test_truncated_png(img):
    raw = base64.b64decode(encode_png_b64(img))
    expect_error(base64.b64encode(raw[:40]).decode(), "images[7]", "not a decodable PNG")


def test_corrupt_png_data(img):
    raw = bytearray(base64.b64decode(encode_png_b64(img)))
    idat = raw.index(b"IDAT")
    raw[idat + 6 : idat + 30] = b"\xff" * 24  # garbage in the zlib stream
    expect_error(base64.b64encode(bytes(raw)).decode(), "images[0]", "not a decodable PNG")


def test_wrong_size_png():
    im = Image.fromarray(np.zeros((32, 32), dtype=np.uint8))
    expect_error(png_b64(im), "images[4]", "expected 28x28, got 32x32")


def test_wrong_size_png_reports_width_x_height():
    im = Image.fromarray(np.zeros((20, 40), dtype=np.uint8))  # 20 rows, 40 columns
    expect_error(png_b64(im), "x", "got 40x20")


def test_huge_png_header_rejected_cheaply():
    # A valid PNG claiming a 100000x100000 image: refused on the header's size, no decoding.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"")
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    expect_error(base64.b64encode(raw).decode(), "x", "expected 28x28, got 100000x100000")


def test_too_large_string():
    expect_error("A" * (2 * 1024 * 1024), "x", "too large")


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ([[0] * 28] * 27, "shape 27x28"),
        ([[0] * 27] * 28, "shape 28x27"),
        ([[[0]] * 28] * 28, "shape 28x28x1"),
        ([0] * 784, "shape 784"),
        ([], "shape 0"),
    ],
)
def test_array_wrong_shape(value, found):
    expect_error(value, "images[9]", "expected a 28x28 array", found)


def test_array_ragged():
    value = [[0] * 28 for _ in range(28)]
    value[5] = [0] * 27
    expect_error(value, "images[0]", "expected a 28x28 array", "ragged", "row 5")


def test_array_row_not_a_list():
    value = [[0] * 28 for _ in range(27)] + ["x" * 28]
    expect_error(value, "images[0]", "expected a 28x28 array")


@pytest.mark.parametrize(
    ("entry", "what"),
    [(3.0, "floats"), (0.5, "floats"), (True, "booleans"), ("7", "strings"), (None, "nulls")],
)
def test_array_non_int_entries(entry, what):
    value = [[0] * 28 for _ in range(28)]
    value[10][11] = entry
    expect_error(value, "images[6]", "ints in 0..255", what)


def test_array_all_bools_rejected():
    expect_error([[False] * 28 for _ in range(28)], "x", "booleans")


@pytest.mark.parametrize(("entry", "pos"), [(256, "[2][3]"), (-1, "[2][3]"), (10**30, "[2][3]")])
def test_array_out_of_range(entry, pos):
    value = [[0] * 28 for _ in range(28)]
    value[2][3] = entry
    expect_error(value, "images[8]", "0..255", str(entry), pos)


def test_error_is_value_error_with_field_and_message():
    err = ImageDecodeError("images[3]", "boom")
    assert isinstance(err, ValueError)
    assert err.field == "images[3]" and err.message == "boom"
    assert str(err) == "images[3]: boom"


# ------------------------------------------------------------------------------------------ encode


def test_encode_images_png_and_array(img):
    batch = np.stack([img, 255 - img])
    pngs = encode_images(batch, "png")
    assert len(pngs) == 2 and all(isinstance(s, str) for s in pngs)
    np.testing.assert_array_equal(decode_images(pngs), batch)
    arrays = encode_images(batch, "array")
    assert arrays == batch.tolist()
    assert type(arrays[0][0][0]) is int
    np.testing.assert_array_equal(decode_images(arrays), batch)


def test_encode_images_bad_input(img):
    with pytest.raises(ValueError):
        encode_images(img[None], "jpeg")
    with pytest.raises(ValueError):
        encode_images(img, "png")  # not a batch
    with pytest.raises(ValueError):
        encode_images(img[None].astype(np.float32), "png")
    with pytest.raises(ValueError):
        encode_png_b64(img.astype(np.int64))


def test_to_uint8():
    x = np.array([[-5.0, 0.4, 0.6, 127.5, 254.6, 300.0, np.nan, np.inf, -np.inf]], dtype=np.float32)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert out.tolist() == [[0, 0, 1, 128, 255, 255, 0, 255, 0]]


def test_to_uint8_shapes_and_ints():
    x = np.linspace(0, 255, 2 * 28 * 28).reshape(2, 1, 28, 28)
    out = to_uint8(x)
    assert out.shape == (2, 1, 28, 28) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert to_uint8(np.array([-3, 7, 900])).tolist() == [0, 7, 255]
    u = np.arange(10, dtype=np.uint8)
    assert to_uint8(u) is u


def test_decode_takes_the_model_image_size():
    """A model's own geometry (height, width) replaces the MNIST default: arrays and PNGs of that size pass,
    others are refused with the size the model takes, written width x height."""
    tall = np.arange(14 * 20, dtype=np.uint8).reshape(14, 20)
    size = tall.shape
    out = decode_images([tall.tolist(), encode_png_b64(tall)], size=size)
    assert out.shape == (2, 14, 20) and (out == tall).all()
    with pytest.raises(ImageDecodeError, match=r"expected 20x14, got 28x28") as info:
        decode_images([encode_png_b64(np.zeros((28, 28), np.uint8))], size=size)
    assert info.value.field == "images[0]"
    with pytest.raises(ImageDecodeError, match=r"expected a 20x14 array, got shape 20x14"):
        decode_image(tall.T.tolist(), "start", size)
