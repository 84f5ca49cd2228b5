"""Evaluation maths: a logged classifier on a manifest's raw images, clean and perturbed.

A model is its two data files, ``weights.safetensors`` and ``model.json`` (``model_files``;
nothing else in a model folder is read, so nothing in it runs), loaded as the one loaded-model
type, ``inference.LeukemiaModel`` (``from_folder``), so that raw images are scored exactly as
the served model scores them. Perturbations (``PERTURBATIONS``) apply to the raw image, before that
preprocessing. No MLflow here: ``steps.evaluate`` finds the model (``model_uri.resolve``) and
logs the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from . import images, inference, metrics
from .data import SPLITS, read_manifest
from .inference import LeukemiaModel
from .segmentation import preprocess_image

# ---------------------------------------------------------------------------------------------
# Perturbations: H x W x 3 uint8 RGB in, the same shape out, before the model's preprocessing

NOISE_SD = 10.0  # grey levels
JPEG_QUALITY = 30


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def clean(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rgb


def darken(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """I' = round(0.6 I): under-exposure."""
    return _to_uint8(rgb * np.float32(0.6))


def brighten(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """I' = min(255, round(1.4 I)): over-exposure (bright background saturates)."""
    return _to_uint8(rgb * np.float32(1.4))


def gaussian_noise(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """I' = clip(round(I + n)), n ~ N(0, 10^2) per pixel and channel: sensor noise."""
    noise = rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(NOISE_SD)
    return _to_uint8(rgb + noise)


def blur(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """5 x 5 Gaussian blur, sigma 1.5: slight defocus."""
    return cv2.GaussianBlur(rgb, (5, 5), 1.5)


def jpeg30(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A JPEG round trip at quality 30: heavy compression artefacts."""
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return cv2.cvtColor(cv2.imdecode(buffer, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


STAIN_HUE_DEGREES = 10
STAIN_SATURATION = 1.25


def stain_shift(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hue rotated by 10 degrees and saturation x 1.25 (OpenCV's HSV, H in 2-degree units):
    another stain batch or scanner colour profile."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    hue = (hsv[..., 0].astype(np.int16) + STAIN_HUE_DEGREES // 2) % 180
    hsv[..., 0] = hue.astype(np.uint8)
    hsv[..., 1] = _to_uint8(hsv[..., 1] * np.float32(STAIN_SATURATION))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


# Each perturbation's noise is seeded by its position here: new ones go at the end, so the
# numbers of the others do not change.
PERTURBATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "clean": clean,
    "darken": darken,
    "brighten": brighten,
    "noise": gaussian_noise,
    "blur": blur,
    "jpeg30": jpeg30,
    "stain": stain_shift,
}


def _check_perturbations(names: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys([names] if isinstance(names, str) else names))
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown or not names:
        raise ValueError(
            f"unsupported perturbations {unknown or names}; expected some of "
            f"{', '.join(PERTURBATIONS)}"
        )
    return names


# ---------------------------------------------------------------------------------------------
# Prediction


def _check_rgb(rgb, index: int = 0) -> np.ndarray:
    if not (
        isinstance(rgb, np.ndarray)
        and rgb.dtype == np.uint8
        and rgb.ndim == 3
        and rgb.shape[2] == 3
        and rgb.shape[0] > 0
        and rgb.shape[1] > 0
    ):
        got = f"dtype {rgb.dtype}, shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb)
        raise ValueError(f"image {index}: expected a uint8 RGB array (H, W, 3), got {got}")
    return np.ascontiguousarray(rgb)


def model_input(model: LeukemiaModel, rgb: np.ndarray) -> np.ndarray:
    """S x S x 3 uint8: what the network sees for one raw RGB image (resize, segmentation)."""
    return preprocess_image(_check_rgb(rgb), model.segmentation)


def batch_tensor(model: LeukemiaModel, inputs: Sequence[np.ndarray]) -> torch.Tensor:
    """N x S x S x 3 uint8 model inputs -> the normalised N x 3 x S x S batch on the device."""
    return inference.model_batch(np.stack(inputs), model.transform, model.device)


def _probabilities(
    model: LeukemiaModel, inputs: Sequence[np.ndarray], batch_size: int
) -> np.ndarray:
    """Model inputs -> (n, C) float64 probabilities, computed as the served model does."""
    if len(inputs) == 0:
        return np.zeros((0, len(model.classes)))
    return inference.probabilities(
        model.classifier,
        model.transform,
        model.device,
        np.stack(inputs),
        batch_size,
        model.spec.temperature,
    )


def _pool() -> ThreadPoolExecutor:
    # OpenCV and PIL release the GIL: threads scale over the cores without pickling images.
    return ThreadPoolExecutor(len(os.sched_getaffinity(0)), thread_name_prefix="leukemia-eval")


def predict_rgb(
    model: LeukemiaModel, rgbs: Sequence[np.ndarray], batch_size: int = 32
) -> np.ndarray:
    """Class probabilities (n, C) for raw H x W x 3 uint8 RGB images (any sizes)."""
    _check_batch_size(batch_size)
    rgbs = [_check_rgb(rgb, i) for i, rgb in enumerate(rgbs)]
    with _pool() as pool:
        inputs = list(pool.map(lambda rgb: preprocess_image(rgb, model.segmentation), rgbs))
    return _probabilities(model, inputs, batch_size)


# ---------------------------------------------------------------------------------------------
# A manifest's raw images


def resolve_dataset_root(manifest_path: Path, dataset_root) -> Path:
    """``dataset_root``, else the one ``params.json`` next to the manifest names."""
    if dataset_root is None:
        params = manifest_path.parent / "params.json"
        try:
            dataset_root = json.loads(params.read_text(encoding="utf-8"))["dataset_root"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"no dataset_root given and none in {str(params)!r}; pass dataset_root, the "
                "folder the manifest's paths are relative to"
            ) from None
    root = Path(dataset_root)
    if not root.is_dir():
        raise ValueError(
            f"dataset_root {str(root)!r} is not a folder; expected the folder the manifest's "
            "paths are relative to (the raw dataset preprocess read)"
        )
    return root


def read_raw(root: Path, row: dict, max_pixels: int) -> np.ndarray:
    path = root / row["path"]
    data = path.read_bytes()
    # The manifest's hash pins the test set: a replaced file would change what is measured.
    if row.get("sha256") and images.sha256(data) != row["sha256"]:
        raise ValueError(
            f"{str(path)!r} is not the file the manifest lists (sha256 differs); expected the "
            "dataset that preprocess read"
        )
    try:
        return images.decode_image(data, max_pixels)
    except images.UnreadableImage as error:
        raise ValueError(f"{str(path)!r}: {error}") from None


def _perturbed_input(model: LeukemiaModel, seed: int, name: str, index: int, rgb: np.ndarray):
    """The model input for image ``index`` under perturbation ``name``; its noise comes from
    ``default_rng((seed, position of name in PERTURBATIONS, index))``."""
    rng = np.random.default_rng((seed, list(PERTURBATIONS).index(name), index))
    return preprocess_image(PERTURBATIONS[name](rgb, rng), model.segmentation)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def evaluate_manifest(
    model: LeukemiaModel,
    manifest_path,
    dataset_root=None,
    split: str = "test",
    perturbations: Sequence[str] = ("clean",),
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, dict]:
    """Score one split's raw images under each perturbation.

    Returns ``{condition: {"labels": (n,) int, "probabilities": (n, C), "paths": [n]}}`` with
    rows in manifest order; labels index ``model.classes``. Each raw image is read once, in
    chunks of ``batch_size``, so memory stays bounded whatever the dataset's image sizes. Image
    i's noise is the same whatever the threads, chunks or other perturbations asked for (see
    ``_perturbed_input``).
    """
    names = _check_perturbations(perturbations)
    _check_batch_size(batch_size)
    if split not in SPLITS:
        raise ValueError(f"unsupported split, got {split!r}; expected one of {', '.join(SPLITS)}")
    manifest_path = Path(manifest_path)
    rows = [r for r in read_manifest(manifest_path) if r["split"] == split]
    if not rows:
        raise ValueError(f"manifest {str(manifest_path)!r} lists no {split!r} images")
    root = resolve_dataset_root(manifest_path, dataset_root)
    unknown = sorted({r["class"] for r in rows} - set(model.classes))
    if unknown:
        raise ValueError(f"manifest classes {unknown} are not among the model's {model.classes}")
    missing = [r["path"] for r in rows if not (root / r["path"]).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(rows)} {split} images of {str(manifest_path)!r} are "
            f"missing under {str(root)!r} (e.g. {missing[:3]}); pass the dataset_root they are "
            "relative to"
        )
    labels = np.array([model.classes.index(r["class"]) for r in rows], dtype=np.int64)
    max_pixels = int(model.max_pixels)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    starts = range(0, len(rows), batch_size)
    with _pool() as pool:
        bar = tqdm(starts, desc=f"evaluate {split}", unit="batch", leave=False, disable=None)
        for start in bar:
            chunk = rows[start : start + batch_size]
            raws = list(pool.map(lambda row: read_raw(root, row, max_pixels), chunk))
            for name in names:
                jobs = [(name, start + i, rgb) for i, rgb in enumerate(raws)]
                inputs = list(pool.map(lambda job: _perturbed_input(model, seed, *job), jobs))
                chunks[name].append(_probabilities(model, inputs, batch_size))
    paths = [r["path"] for r in rows]
    return {
        name: {"labels": labels.copy(), "probabilities": np.concatenate(c), "paths": list(paths)}
        for name, c in chunks.items()
    }


def robustness_table(results: dict[str, dict]) -> list[dict]:
    """One row per condition: accuracy, f1_macro, roc_auc_macro, ece and accuracy_drop (clean
    accuracy minus the condition's; positive when the perturbation hurts)."""
    rows = []
    for name, result in results.items():
        report = metrics.classification_metrics(result["labels"], result["probabilities"])
        rows.append(
            {
                "condition": name,
                "accuracy": report["accuracy"],
                "f1_macro": report["f1_macro"],
                "roc_auc_macro": report["roc_auc_macro"],
                "ece": report["ece"],
            }
        )
    clean_accuracy = next((r["accuracy"] for r in rows if r["condition"] == "clean"), None)
    for row in rows:
        row["accuracy_drop"] = None if clean_accuracy is None else clean_accuracy - row["accuracy"]
    return rows


def worst_case(table: list[dict]) -> dict | None:
    """The perturbed condition with the lowest accuracy (the arm's "robust" accuracy), or None
    when the table holds only the clean images."""
    perturbed = [row for row in table if row["condition"] != "clean"]
    return min(perturbed, key=lambda row: row["accuracy"]) if perturbed else None
