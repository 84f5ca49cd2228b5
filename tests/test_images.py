"""Decoding every supported input to 8-bit RGB, rejecting bad files, hashing, PNG round trips."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from leukemia import images, synthetic

from .conftest import REAL_DATA, requires_real_data


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def rgb() -> np.ndarray:
    return synthetic.make_image(0, "Pre-B", 0, size=64)[0]


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_decode_exactly(rgb, fmt):
    np.testing.assert_array_equal(images.decode_image(encode(rgb, fmt)), rgb)


def test_jpeg_fast_path_equals_pil(rgb):
    data = encode(rgb, "JPEG", quality=90)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(images.decode_image(data), expected)
    gray = encode(rgb[:, :, 1], "JPEG", quality=90)
    expected = np.asarray(Image.open(io.BytesIO(gray)).convert("RGB"))
    np.testing.assert_array_equal(images.decode_image(gray), expected)


def test_grayscale_rgba_palette_and_16_bit_become_rgb8(rgb):
    gray = rgb[:, :, 0]
    out = images.decode_image(encode(gray, "PNG"))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))

    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    np.testing.assert_array_equal(images.decode_image(encode(rgba, "PNG")), rgb)

    palette = Image.fromarray(rgb).quantize(colors=16)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(images.decode_image(buffer.getvalue()), expected)

    sixteen = gray.astype(np.uint16) * 257  # 8-bit value v -> 16-bit v * 257
    ok, png16 = cv2.imencode(".png", sixteen)
    assert ok
    out = images.decode_image(png16.tobytes())
    assert out.dtype == np.uint8 and out.shape == (*gray.shape, 3)
    np.testing.assert_array_equal(out[:, :, 0], gray)


def test_bad_files_raise_with_a_reason(rgb):
    with pytest.raises(images.UnreadableImage, match="empty file"):
        images.decode_image(b"")
    with pytest.raises(images.UnreadableImage, match="not an image"):
        images.decode_image(b"this is a text file, not a picture\n" * 10)
    jpeg = encode(rgb, "JPEG")
    with pytest.raises(images.UnreadableImage, match="truncated"):
        images.decode_image(jpeg[: len(jpeg) // 2])
    png = encode(rgb, "PNG")
    with pytest.raises(images.UnreadableImage, match="truncated"):
        images.decode_image(png[: len(png) // 2])
    with pytest.raises(images.UnreadableImage, match="exceeds the limit of 1000"):
        images.decode_image(jpeg, max_pixels=1000)


def test_decompression_bomb_is_rejected_before_decoding():
    # A tiny PNG whose header claims 100,000 x 100,000 pixels (valid CRC): the size check must
    # refuse it from the header, before any pixel is decoded.
    png = bytearray(encode(np.zeros((1, 1), np.uint8), "PNG"))
    png[16:24] = struct.pack(">II", 100_000, 100_000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    bomb = bytes(png)
    with pytest.raises(images.UnreadableImage, match="pixels"):
        images.decode_image(bomb)


def test_dhash_separates_near_copies_from_other_pictures():
    a = synthetic.make_image(0, "Pro-B", 0)[0]
    b = synthetic.make_image(0, "Pro-B", 1)[0]
    gray = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    recompressed = cv2.imdecode(cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 60])[1], 1)
    near = cv2.cvtColor(recompressed, cv2.COLOR_BGR2GRAY)
    other = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    distance = lambda x, y: bin(images.dhash(x) ^ images.dhash(y)).count("1")  # noqa: E731
    assert distance(gray, gray) == 0
    assert distance(gray, near) <= 4
    assert distance(gray, other) > 12
    assert 0 <= images.dhash(gray) < 2**64


@pytest.mark.parametrize("shape", [(50, 40), (50, 40, 3)])
def test_png_round_trip_is_exact(tmp_path, shape):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(images.encode_png(array))
    expected = array if array.ndim == 3 else np.repeat(array[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(images.read_png(path), expected)


@requires_real_data
def test_real_jpegs_decode_as_pil_does():
    for path in sorted(REAL_DATA.rglob("*.jpg"))[::100]:
        expected = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(images.read_image(path), expected)
