"""The served model: image files (or RGB arrays) in, the training-time preprocessing, class
probabilities out, as an MLflow pyfunc.

Artifacts, written by ``log_served_model`` and read by ``LeukemiaModel.load_context``:

- ``weights.safetensors``: the state dict of the whole ``Classifier`` (backbone and head);
- ``model.json``: ``{"model": timm name, "dropout", "num_classes", "classes", "mean", "std",
  "segmentation": SegmentationParams.to_dict(), "max_pixels"}``;
- ``served_model.py`` (MLflow's "model from code", instead of a pickle): builds a
  ``LeukemiaModel``, so the ``leukemia`` package must be installed where the model is loaded.

``predict`` takes a DataFrame with a string column ``image`` of base64-encoded image files (what
``mlflow models serve`` receives as ``{"dataframe_split": {"columns": ["image"], "data":
[[b64], ...]}}``), or, in process, an N x H x W x 3 or H x W x 3 uint8 RGB array. Each image
goes through ``segmentation.preprocess_image`` with the logged parameters and the evaluation
transform (``datasets.build_transform(False, mean, std)``), exactly as in training. It returns a
DataFrame with ``label`` and one ``prob_<class>`` column per class, rows in input order.

A malformed request raises ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` and a one-line
message. MLflow's scoring server answers it with HTTP 400 and ``{"error_code":
"INVALID_PARAMETER_VALUE", "message": "Failed to predict data '<the DataFrame>'. Error:
<message>", ...}`` (``ERROR_CODE_TO_HTTP_STATUS`` in ``mlflow/exceptions.py``).

The pyfunc wrapper checks a DataFrame against the signature (one string column ``image``) before
``predict`` runs, so arrays reach ``predict`` only through
``mlflow.pyfunc.load_model(uri).unwrap_python_model().predict(None, array)``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema

from . import images
from .data import CLASSES
from .datasets import build_transform
from .model import Classifier, create_classifier
from .segmentation import SegmentationParams, preprocess_image

IMAGE_COLUMN = "image"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "model.json"
# Images per forward pass. On a CPU, big batches are slower per image: activations above
# glibc's mmap threshold are fresh memory on every pass, and page faults take over
# (efficientnet_b4 at 224 x 224 on 2 cores: 57 ms per image in pairs, 79 in 8s, 229 in 32s). So a
# CPU pass holds about 100,000 pixels: 2 images at 224 x 224, 24 at 64 x 64.
CUDA_BATCH_SIZE = 32
CPU_BATCH_PIXELS = 2 * 224 * 224
_EXPECTED_IMAGE = "base64 of an image file (PNG, JPEG, BMP or TIFF)"
# File signatures of the formats decode_image reads, to tell a client who forgot base64.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
# What the served model imports. Listed rather than inferred: MLflow's inference loads the
# model in a subprocess, which costs seconds per log_model.
_REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "numpy",
    "pandas",
    "opencv-python-headless",
    "pillow",
)


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def prob_column(class_name: str) -> str:
    return f"prob_{class_name}"


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


def decode_request_image(value, row: int, max_pixels: int) -> np.ndarray:
    """One ``image`` value -> H x W x 3 uint8 RGB."""
    data = decode_base64(value, row)
    try:
        return images.decode_image(data, max_pixels)
    except images.UnreadableImage as error:
        raise _invalid(
            f"row {row} of column {IMAGE_COLUMN!r}: {error}; expected {_EXPECTED_IMAGE}"
        ) from None


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


class LeukemiaModel(mlflow.pyfunc.PythonModel):
    """Image files or RGB arrays -> ``label`` and ``prob_<class>`` per image (see the module)."""

    def load_context(self, context) -> None:
        config = json.loads(Path(context.artifacts["config"]).read_text(encoding="utf-8"))
        self.classes = list(config["classes"])
        self.max_pixels = int(config["max_pixels"])
        self.segmentation = segmentation_params(config["segmentation"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.transform = build_transform(False, config["mean"], config["std"])
        model = create_classifier(
            config["model"],
            num_classes=config["num_classes"],
            dropout=config["dropout"],
            pretrained="none",
        )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model = model.to(self.device).eval()
        pixels = self.segmentation.image_size**2
        on_gpu = self.device.type == "cuda"
        self.batch_size = CUDA_BATCH_SIZE if on_gpu else max(1, CPU_BATCH_PIXELS // pixels)

    # Annotated with what serving sends (unannotated, MLflow warns on import); in process an
    # array is accepted too.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise _invalid(
                    f"expected a column {IMAGE_COLUMN!r} of base64-encoded image files, got "
                    f"columns {[str(c) for c in model_input.columns]}"
                )
            values = model_input[IMAGE_COLUMN].tolist()
            jobs = [(self._preprocess_encoded, value, row) for row, value in enumerate(values)]
        elif isinstance(model_input, np.ndarray):
            batch = check_rgb_batch(model_input, self.max_pixels)
            jobs = [(self._preprocess_rgb, rgb) for rgb in batch]
        else:
            raise _invalid(
                f"expected a DataFrame with a column {IMAGE_COLUMN!r} or a uint8 RGB array, got "
                f"{type(model_input).__name__}"
            )
        return self._predict_preprocessed(_run_all(jobs))

    def _preprocess_encoded(self, value, row: int) -> np.ndarray:
        rgb = decode_request_image(value, row, self.max_pixels)
        return preprocess_image(rgb, self.segmentation)

    def _preprocess_rgb(self, rgb: np.ndarray) -> np.ndarray:
        return preprocess_image(np.ascontiguousarray(rgb), self.segmentation)

    def _predict_preprocessed(self, batch: np.ndarray) -> pd.DataFrame:
        """N x S x S x 3 uint8 model inputs -> the output DataFrame."""
        probs = probabilities(self.model, self.transform, self.device, batch, self.batch_size)
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
    model: Classifier, transform, device, inputs: np.ndarray, batch_size: int
) -> np.ndarray:
    """N x S x S x 3 uint8 model inputs -> (N, C) float64 softmax, ``batch_size`` at a time:
    what the served model returns, and what evaluation scores."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            logits = model(model_batch(inputs[start : start + batch_size], transform, device))
            chunks.append(torch.softmax(logits.double(), dim=1).cpu())
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


# ---------------------------------------------------------------------------------------------
# Logging


def segmentation_params(values: dict | SegmentationParams):
    """``SegmentationParams`` from its ``to_dict()`` (the derived ``resolved_foreground`` is
    dropped); unknown keys raise."""
    if isinstance(values, SegmentationParams):
        return values
    names = {f.name for f in fields(SegmentationParams)}
    unknown = sorted(set(values) - names - {"resolved_foreground"})
    if unknown:
        raise ValueError(
            f"unknown segmentation keys {unknown}; expected some of {', '.join(sorted(names))}"
        )
    return SegmentationParams(**{k: v for k, v in values.items() if k in names})


def served_signature(classes: Sequence[str]) -> ModelSignature:
    """Input: a string column ``image``; output: ``label`` and a double ``prob_<class>`` each."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema(
            [ColSpec(DataType.string, "label")]
            + [ColSpec(DataType.double, prob_column(name)) for name in classes]
        ),
    )


def example_request(size: int = 64) -> pd.DataFrame:
    """One synthetic smear as a base64 PNG: small, so MLflow's check that the example serves
    (one prediction when logging) stays quick."""
    from .synthetic import make_image

    rgb, _ = make_image(0, CLASSES[0], 0, size)
    png = images.encode_png(rgb)
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(png).decode("ascii")]})


_MODEL_CODE = """\
import mlflow

from leukemia.serving import LeukemiaModel

mlflow.models.set_model(LeukemiaModel())
"""


def _pinned_requirements() -> list[str]:
    # Local version labels (torch's "+cpu") are not on PyPI; MLflow drops them the same way.
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in _REQUIREMENTS]


def write_model_files(
    folder: str | os.PathLike,
    classifier: Classifier,
    *,
    model_name: str,
    dropout: float,
    mean: Sequence[float],
    std: Sequence[float],
    segmentation: dict | SegmentationParams,
    classes: Sequence[str] = CLASSES,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
) -> tuple[Path, Path]:
    """Write ``weights.safetensors`` and ``model.json`` (see the module) into ``folder``: the
    served model's artifacts, and training's ``checkpoint/``. Returns their paths."""
    num_classes = classifier.head.out_features
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a classifier with {num_classes} outputs")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    config = {
        "model": model_name,
        "dropout": float(dropout),
        "num_classes": num_classes,
        "classes": [str(c) for c in classes],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "segmentation": segmentation_params(segmentation).to_dict(),
        "max_pixels": int(max_pixels),
    }
    from safetensors.torch import save_file

    weights, config_path = Path(folder, WEIGHTS_FILE), Path(folder, CONFIG_FILE)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(weights))
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return weights, config_path


def log_served_model(
    classifier: Classifier,
    *,
    model_name: str,
    dropout: float,
    mean: Sequence[float],
    std: Sequence[float],
    segmentation: dict | SegmentationParams,
    classes: Sequence[str] = CLASSES,
    name: str = "classifier",
    registered_model_name: str | None = None,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    input_example: pd.DataFrame | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log ``classifier`` with its preprocessing as a pyfunc (in the active run, if any).

    ``model_name``/``dropout`` rebuild the architecture (``create_classifier``); ``mean``/``std``
    and ``segmentation`` are the training-time normalisation and ``SegmentationParams``;
    ``classes`` name the outputs in logit order. The ``leukemia`` package must be importable
    where the model is loaded. Returns MLflow's ``ModelInfo`` (``model_uri``, and
    ``registered_model_version`` when ``registered_model_name`` is given).
    """
    with tempfile.TemporaryDirectory(prefix="leukemia-serving-") as scratch:
        weights, config_path = write_model_files(
            scratch,
            classifier,
            model_name=model_name,
            dropout=dropout,
            mean=mean,
            std=std,
            segmentation=segmentation,
            classes=classes,
            max_pixels=max_pixels,
        )
        # Models from code: MLflow stores this file, not a pickle of LeukemiaModel, and runs it
        # at load time, so the model follows the installed leukemia package.
        code_path = Path(scratch, "served_model.py")
        code_path.write_text(_MODEL_CODE, encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_path),
            artifacts={"weights": str(weights), "config": str(config_path)},
            signature=served_signature([str(c) for c in classes]),
            input_example=example_request() if input_example is None else input_example,
            registered_model_name=registered_model_name,
            pip_requirements=_pinned_requirements(),
        )
