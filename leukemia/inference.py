"""Inference on raw images: the training-time preprocessing, then class probabilities. No MLflow
here: ``serving`` wraps ``LeukemiaModel`` as the pyfunc that ``mlflow models serve`` loads, and
evaluation scores with the same code.

``LeukemiaModel.predict`` takes a DataFrame with a string column ``image`` of base64-encoded
image files, or an N x H x W x 3 or H x W x 3 uint8 RGB array. Each image goes through
``segmentation.preprocess_image`` with the model's parameters and the evaluation transform
(``datasets.build_transform(False, mean, std)``), exactly as in training. It returns a DataFrame
with ``label`` and one ``prob_<class slug>`` column per class (``data.prob_column``), rows in
input order. A malformed or oversized request raises ``InvalidRequest`` with a one-line message.
"""

from __future__ import annotations

import base64
import binascii
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import images, model_files
from .data import prob_column
from .datasets import build_transform
from .model import Classifier
from .model_files import ModelSpec
from .segmentation import preprocess_image

IMAGE_COLUMN = "image"
# Images per forward pass. On a CPU, big batches are slower per image: activations above
# glibc's mmap threshold are fresh memory on every pass, and page faults take over
# (efficientnet_b4 at 224 x 224 on 2 cores: 57 ms per image in pairs, 79 in 8s, 229 in 32s). So a
# CPU pass holds about 100,000 pixels: 2 images at 224 x 224, 24 at 64 x 64.
CUDA_BATCH_SIZE = 32
CPU_BATCH_PIXELS = 2 * 224 * 224
# Per-request limits, checked before any pixel is decoded (each image's own limit is the
# model's max_pixels). Set where the model is served: LEUKEMIA_SERVE_MAX_ROWS=... mlflow models
# serve ...
MAX_ROWS_ENV, MAX_ROWS = "LEUKEMIA_SERVE_MAX_ROWS", 64
MAX_PIXELS_ENV, MAX_REQUEST_PIXELS = "LEUKEMIA_SERVE_MAX_PIXELS", 50_000_000
_EXPECTED_IMAGE = "base64 of an image file (PNG, JPEG, BMP or TIFF)"
# File signatures of the formats decode_image reads, to tell a client who forgot base64.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")


class InvalidRequest(ValueError):
    """A malformed request: the message names the row and what was expected (one line). The
    served pyfunc answers it with HTTP 400."""


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(message)


def encode_image_file(path: str | os.PathLike) -> str:
    """Base64 text of an image file's bytes: one value of the ``image`` column."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Request parsing: each helper returns what the model needs or raises a client error


def decode_base64(value, row: int) -> bytes:
    """The file bytes of one ``image`` value (base64 as str or bytes; line breaks allowed)."""
    where = f"row {row} of column {IMAGE_COLUMN!r}"
    if not isinstance(value, (str, bytes)):
        raise _invalid(f"{where}: expected {_EXPECTED_IMAGE}, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        pass
    if isinstance(value, bytes) and value.startswith(_IMAGE_MAGIC):
        raise _invalid(f"{where}: got raw image bytes; expected them base64-encoded")
    try:  # base64 wrapped into lines (as the `base64` tool writes it)
        compact = "".join(value.split()) if isinstance(value, str) else b"".join(value.split())
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise _invalid(f"{where}: not valid base64 ({error}); expected {_EXPECTED_IMAGE}") from None


def _header_pixels(data: bytes, row: int) -> int:
    """Width x height of one decoded ``image`` value, from its header (no pixels decoded)."""
    try:
        width, height = images.image_size(data)
    except images.UnreadableImage as error:
        raise _invalid(
            f"row {row} of column {IMAGE_COLUMN!r}: {error}; expected {_EXPECTED_IMAGE}"
        ) from None
    return width * height


def _limit_from_env(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return int(text)


def check_rgb_batch(array: np.ndarray, max_pixels: int) -> np.ndarray:
    """An H x W x 3 or N x H x W x 3 uint8 array as N x H x W x 3."""
    expected = "a uint8 RGB array of shape (H, W, 3) or (N, H, W, 3)"
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise _invalid(f"expected {expected}, got dtype {array.dtype} and shape {array.shape}")
    batch = array[None] if array.ndim == 3 else array
    height, width = batch.shape[1:3]
    if height == 0 or width == 0:
        raise _invalid(f"expected {expected} with H, W >= 1, got shape {array.shape}")
    if height * width > max_pixels:
        raise _invalid(
            f"expected images of at most {max_pixels} pixels, got {width}x{height} = "
            f"{width * height}"
        )
    return batch


# ---------------------------------------------------------------------------------------------
# The pyfunc


class LeukemiaModel:
    """Image files or RGB arrays -> ``label`` and ``prob_<class>`` per image (see the module)."""

    def __init__(
        self, classifier: Classifier, spec: ModelSpec, device: torch.device, source: str = ""
    ):
        self.spec = spec
        self.source = source  # where it was loaded from (a URI or an absolute path), in messages
        self.classes = list(spec.classes)
        self.max_pixels = spec.max_pixels
        self.segmentation = spec.segmentation
        self.device = device
        self.transform = build_transform(False, spec.mean, spec.std)
        self.classifier = classifier  # in eval mode
        pixels = self.segmentation.image_size**2
        on_gpu = self.device.type == "cuda"
        self.batch_size = CUDA_BATCH_SIZE if on_gpu else max(1, CPU_BATCH_PIXELS // pixels)
        self.max_rows = _limit_from_env(MAX_ROWS_ENV, MAX_ROWS)
        self.max_request_pixels = _limit_from_env(MAX_PIXELS_ENV, MAX_REQUEST_PIXELS)

    @property
    def image_size(self) -> int:
        """The side of the square model input."""
        return self.segmentation.image_size

    def get_raw_model(self) -> LeukemiaModel:
        """What ``mlflow.pyfunc.load_model(uri).get_raw_model()`` returns: this object, whose
        ``predict`` also takes RGB arrays."""
        return self

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, source: str | None = None) -> LeukemiaModel:
        """Read the two model files in ``folder`` (``model_files.load``: data only)."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        classifier, spec = model_files.load(folder, source, device)
        return cls(classifier, spec, device, source or str(Path(folder).resolve()))

    def predict(self, model_input: pd.DataFrame | np.ndarray, params=None) -> pd.DataFrame:
        """What MLflow's pyfunc wrapper calls (after checking a DataFrame against the
        signature); in process an array is accepted too."""
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise _invalid(
                    f"expected a column {IMAGE_COLUMN!r} of base64-encoded image files, got "
                    f"columns {[str(c) for c in model_input.columns]}"
                )
            values = model_input[IMAGE_COLUMN].tolist()
            self._check_request(len(values), None)
            files = [decode_base64(value, row) for row, value in enumerate(values)]
            self._check_request(
                len(files), [_header_pixels(data, row) for row, data in enumerate(files)]
            )
            jobs = [(self._preprocess_file, data, row) for row, data in enumerate(files)]
        elif isinstance(model_input, np.ndarray):
            batch = check_rgb_batch(model_input, self.max_pixels)
            self._check_request(len(batch), [batch.shape[1] * batch.shape[2]] * len(batch))
            jobs = [(self._preprocess_rgb, rgb) for rgb in batch]
        else:
            raise _invalid(
                f"expected a DataFrame with a column {IMAGE_COLUMN!r} or a uint8 RGB array, got "
                f"{type(model_input).__name__}"
            )
        return self._predict_preprocessed(_run_all(jobs))

    def _check_request(self, rows: int, pixels: list[int] | None) -> None:
        """Refuse a request over the per-request limits (see ``MAX_ROWS_ENV``)."""
        if rows > self.max_rows:
            raise _invalid(
                f"expected at most {self.max_rows} images per request ({MAX_ROWS_ENV}), got "
                f"{rows}; send them in several requests"
            )
        if pixels is not None and sum(pixels) > self.max_request_pixels:
            raise _invalid(
                f"expected at most {self.max_request_pixels} pixels per request in all images "
                f"together ({MAX_PIXELS_ENV}), got {sum(pixels)}; send fewer or smaller images"
            )

    def _preprocess_file(self, data: bytes, row: int) -> np.ndarray:
        try:
            rgb = images.decode_image(data, self.max_pixels)
        except images.UnreadableImage as error:
            raise _invalid(
                f"row {row} of column {IMAGE_COLUMN!r}: {error}; expected {_EXPECTED_IMAGE}"
            ) from None
        return preprocess_image(rgb, self.segmentation)

    def _preprocess_rgb(self, rgb: np.ndarray) -> np.ndarray:
        return preprocess_image(np.ascontiguousarray(rgb), self.segmentation)

    def _predict_preprocessed(self, batch: np.ndarray) -> pd.DataFrame:
        """N x S x S x 3 uint8 model inputs -> the output DataFrame."""
        probs = probabilities(
            self.classifier,
            self.transform,
            self.device,
            batch,
            self.batch_size,
            self.spec.temperature,
        )
        labels = np.asarray(self.classes, dtype=object)[probs.argmax(axis=1)]
        return pd.DataFrame(
            {
                "label": labels,
                **{prob_column(name): probs[:, i] for i, name in enumerate(self.classes)},
            }
        )


def model_batch(pixels: np.ndarray, transform, device) -> torch.Tensor:
    """N x S x S x 3 uint8 model inputs -> the normalised N x 3 x S x S batch on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    return transform(tensor.permute(0, 3, 1, 2).contiguous())


def probabilities(
    model: Classifier,
    transform,
    device,
    inputs: np.ndarray,
    batch_size: int,
    temperature: float = 1.0,
) -> np.ndarray:
    """N x S x S x 3 uint8 model inputs -> (N, C) float64 softmax(logits / ``temperature``),
    ``batch_size`` at a time: what the served model returns, and what evaluation scores."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            logits = model(model_batch(inputs[start : start + batch_size], transform, device))
            chunks.append(torch.softmax(logits.double() / temperature, dim=1).cpu())
    if not chunks:
        return np.zeros((0, model.head.out_features))
    return torch.cat(chunks).numpy()


def _run_all(jobs: list[tuple]) -> np.ndarray:
    """Run ``(function, *args)`` jobs in input order on a thread per core; stack the results.

    Decoding (PIL, OpenCV) and the OpenCV steps of the segmentation release the GIL, so threads
    scale with the cores without the pickling of a process pool. The first failing job's error
    propagates; the jobs not yet started are cancelled.
    """
    if len(jobs) <= 1:
        results = [function(*args) for function, *args in jobs]
    else:
        workers = min(len(jobs), len(os.sched_getaffinity(0)))
        with ThreadPoolExecutor(workers, thread_name_prefix="leukemia-preprocess") as pool:
            futures = [pool.submit(function, *args) for function, *args in jobs]
            try:
                results = [future.result() for future in futures]
            finally:  # after a failure, skip the images not yet started
                pool.shutdown(cancel_futures=True)
    if not results:
        return np.zeros((0, 1, 1, 3), np.uint8)
    return np.stack(results)
