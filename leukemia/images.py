"""Reading any supported image file into 8-bit RGB, hashing it, and writing lossless PNGs."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# 50 megapixels: far above any microscope field in the dataset (224 x 224 to 2,592 x 1,944),
# far below what would exhaust memory when a crafted file claims a huge size.
DEFAULT_MAX_PIXELS = 50_000_000


class UnreadableImage(ValueError):
    """A file that cannot be used as an image; ``str(error)`` is the reason for the audit."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; ``UnreadableImage`` for what is not an image."""
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data)).size
    except UnidentifiedImageError:
        raise UnreadableImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as error:
        raise UnreadableImage(f"too many pixels ({error})") from None
    except (OSError, SyntaxError, ValueError, struct.error) as error:
        raise UnreadableImage(f"corrupt or truncated image ({error})") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an H x W x 3 uint8 RGB array.

    Grayscale, palette and RGBA inputs become RGB (alpha is dropped); 16-bit samples keep their
    top 8 bits; EXIF orientation is ignored. Raises ``UnreadableImage`` for empty, truncated,
    non-image or oversized (more than ``max_pixels``) data, before decoding the pixels.
    """
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise UnreadableImage(
                    f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                )
            if _is_complete_plain_jpeg(image, data):
                # Fast path, same pixels as PIL (both use libjpeg-turbo), about 2x quicker.
                flags = _IMREAD_RGB | cv2.IMREAD_IGNORE_ORIENTATION
                rgb = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
                if rgb is not None and rgb.shape == (height, width, 3):
                    return rgb if _IMREAD_RGB != cv2.IMREAD_COLOR else rgb[:, :, ::-1]
            image.load()
    except UnidentifiedImageError:
        raise UnreadableImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as error:
        raise UnreadableImage(f"too many pixels ({error})") from None
    except (OSError, SyntaxError, ValueError, struct.error) as error:
        if isinstance(error, UnreadableImage):
            raise
        raise UnreadableImage(f"corrupt or truncated image ({error})") from None
    return _to_rgb8(image)


# OpenCV >= 4.10 decodes straight to RGB; older versions give BGR.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)


def _is_complete_plain_jpeg(image: Image.Image, data: bytes) -> bool:
    """An 8-bit RGB or gray JPEG that ends in its end-of-image marker (so is not truncated)."""
    return (
        image.format == "JPEG"
        and image.mode in ("RGB", "L")
        and data.rstrip(b"\0")[-2:] == b"\xff\xd9"
    )


def _to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: PIL's convert("RGB") clips instead of scaling.
        values = np.asarray(image).astype(np.int64)
        shift = 8 if values.max(initial=0) > 255 else 0
        gray = np.clip(values >> shift, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGBA" if "transparency" in image.info else image.mode)
        image = image.convert("RGB")
    return np.asarray(image)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read one image file as H x W x 3 uint8 RGB (see ``decode_image``)."""
    return decode_image(Path(path).read_bytes(), max_pixels)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dhash(gray: np.ndarray, hash_size: int = 8) -> int:
    """Difference hash of an H x W uint8 grayscale image.

    Blur-and-halve (``cv2.pyrDown``) while the image is over 4x the hash in both sides, shrink
    to (hash_size + 1) x hash_size by area averaging, and set one bit per horizontal neighbour
    pair where the right pixel is brighter. Returns a ``hash_size**2``-bit integer;
    near-identical pictures differ in few bits. (The halving steps make it 5x cheaper than one
    area resize from 224 x 224, with the same low-pass effect.)
    """
    small = gray
    while small.shape[0] >= 4 * hash_size and small.shape[1] >= 4 * (hash_size + 1):
        small = cv2.pyrDown(small)
    small = cv2.resize(small, (hash_size + 1, hash_size), interpolation=cv2.INTER_AREA)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of an H x W (gray) or H x W x 3 (RGB) uint8 array.

    A segmented image's three channels are identical, so it is stored as one gray plane: reading
    it back as colour (``read_png``) gives the same three channels, at a third of the cost.
    No row filter and zlib's RLE strategy: the black background compresses well and the encoder
    stays cheap (about 0.3 ms for 224 x 224 gray, 1.6 ms for RGB).
    """
    pixels = image if image.ndim == 2 else image[:, :, ::-1]
    png_filter = cv2.IMWRITE_PNG_FILTER_NONE if image.ndim == 2 else cv2.IMWRITE_PNG_FILTER_UP
    options = [
        cv2.IMWRITE_PNG_COMPRESSION,
        1,
        cv2.IMWRITE_PNG_FILTER,
        png_filter,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_RLE,
    ]
    ok, buffer = cv2.imencode(".png", pixels, options)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return buffer.tobytes()


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG written by ``encode_png`` back as H x W x 3 RGB uint8 (gray -> 3 channels)."""
    rgb = cv2.imread(str(path), _IMREAD_RGB)
    if rgb is None:
        raise UnreadableImage(f"cannot read {path}")
    return rgb if _IMREAD_RGB != cv2.IMREAD_COLOR else rgb[:, :, ::-1]
