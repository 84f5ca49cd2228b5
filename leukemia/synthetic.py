"""Procedural blood-smear images in the 3,256-image release's layout, for the demo and the tests.

Each image: a pale, unevenly lit background; red cells as pale pink discs with central pallor;
one to three lymphoblasts, each a pale blue-violet cytoplasm around a purple nucleus. The class
decides the lymphoblasts' nucleus size, outline irregularity, chromatin texture and
nucleus/cytoplasm ratio (roughly as hematogones and the three B-ALL subtypes differ), so that the
class is visible in shape and texture rather than in global colour, and grayscale Otsu with a
``dark`` foreground isolates the cells. Every image depends only on (seed, class, index).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Folder and file-name stem per class, as in the 3,256-image release.
LAYOUT = {
    "Benign": ("Benign", "WBC-Benign"),
    "Early Pre-B": ("Early", "WBC-Malignant-Early"),
    "Pre-B": ("Pre", "WBC-Malignant-Pre"),
    "Pro-B": ("Pro", "WBC-Malignant-Pro"),
}


@dataclass(frozen=True)
class BlastStyle:
    nucleus_radius: float  # mean, in pixels at 224 x 224
    nc_ratio: float  # nucleus radius / cell radius
    irregularity: float  # relative amplitude of the outline's harmonics
    chromatin: float  # contrast of the nuclear texture
    grain: int  # texture blob size in pixels (fine vs clumped chromatin)


STYLES = {
    "Benign": BlastStyle(
        nucleus_radius=13, nc_ratio=0.85, irregularity=0.02, chromatin=12, grain=2
    ),
    "Early Pre-B": BlastStyle(
        nucleus_radius=19, nc_ratio=0.80, irregularity=0.06, chromatin=20, grain=2
    ),
    "Pre-B": BlastStyle(nucleus_radius=25, nc_ratio=0.72, irregularity=0.11, chromatin=30, grain=4),
    "Pro-B": BlastStyle(nucleus_radius=30, nc_ratio=0.64, irregularity=0.17, chromatin=40, grain=6),
}


def _blob(rng, center, radius, irregularity, points=64) -> np.ndarray:
    """Polygon of a closed outline whose radius wobbles with a few random harmonics."""
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    wobble = np.zeros(points)
    for harmonic in range(2, 6):
        wobble += rng.normal(0, irregularity / harmonic**0.5) * np.cos(
            harmonic * angles + rng.uniform(0, 2 * np.pi)
        )
    radii = radius * (1 + wobble)
    xy = np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], 1)
    return np.round(xy * 16).astype(np.int32)  # 4 fractional bits for cv2's shift argument


def draw_smear(class_name: str, rng: np.random.Generator, size: int = 224):
    """One RGB uint8 image (size x size x 3) and the boolean mask of its lymphoblast nuclei."""
    style = STYLES[class_name]
    scale = size / 224
    yy, xx = np.mgrid[0:size, 0:size] / size
    light = 1 + 0.05 * np.sin(2 * np.pi * (xx * rng.uniform(0.3, 1) + yy * rng.uniform(0.3, 1)))
    background = np.array([228, 212, 218]) + rng.normal(0, 4, 3)
    canvas = (background[None, None, :] * light[:, :, None]).astype(np.float32)

    for _ in range(rng.integers(14, 26)):  # red cells, drawn first, may lie under blasts
        center = rng.uniform(0, size, 2)
        radius = rng.uniform(11, 16) * scale
        colour = np.array([232, 178, 188]) + rng.normal(0, 5, 3)
        layer = np.zeros((size, size), np.uint8)
        cv2.fillPoly(layer, [_blob(rng, center, radius, 0.03)], 1, cv2.LINE_AA, shift=4)
        canvas[layer > 0] = colour
        pallor = np.zeros((size, size), np.uint8)
        cv2.circle(pallor, tuple(int(c) for c in center), int(radius * 0.45), 1, -1)
        canvas[pallor > 0] = 0.6 * canvas[pallor > 0] + 0.4 * background

    nuclei = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 4)):
        nucleus_r = max(4.0, rng.normal(style.nucleus_radius, 1.5)) * scale
        cell_r = nucleus_r / style.nc_ratio
        margin = cell_r + 2
        center = rng.uniform(margin, size - margin, 2) if size > 2 * margin else (size / 2,) * 2
        cell = np.zeros((size, size), np.uint8)
        cv2.fillPoly(cell, [_blob(rng, center, cell_r, 0.04)], 1, cv2.LINE_AA, shift=4)
        canvas[cell > 0] = np.array([196, 180, 222]) + rng.normal(0, 4, 3)
        offset = rng.normal(0, 0.15 * (cell_r - nucleus_r), 2)
        nucleus = np.zeros((size, size), np.uint8)
        cv2.fillPoly(
            nucleus,
            [_blob(rng, center + offset, nucleus_r, style.irregularity)],
            1,
            cv2.LINE_AA,
            shift=4,
        )
        grain = max(1, round(style.grain * scale))
        texture = rng.normal(0, 1, (size // grain + 1, size // grain + 1))
        texture = cv2.resize(texture, (size, size), interpolation=cv2.INTER_LINEAR)
        shade = np.array([108, 62, 150])[None, :] + style.chromatin * texture[nucleus > 0, None]
        canvas[nucleus > 0] = shade
        nuclei |= nucleus > 0

    canvas = cv2.GaussianBlur(canvas, (0, 0), 0.8 * scale)
    canvas += rng.normal(0, 3, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8), nuclei


def file_path(class_name: str, index: int) -> str:
    """Relative path of image ``index`` (0-based), e.g. ``Pre/WBC-Malignant-Pre-001.jpg``."""
    folder, stem = LAYOUT[class_name]
    return f"{folder}/{stem}-{index + 1:03d}.jpg"


def make_image(seed: int, class_name: str, index: int, size: int = 224):
    """Image ``index`` of ``class_name`` for ``seed``: (RGB uint8, nucleus mask)."""
    class_index = list(LAYOUT).index(class_name)
    return draw_smear(class_name, np.random.default_rng([seed, class_index, index]), size)


MAX_SIZE = 4096


def generate(
    out_dir, per_class: int = 50, seed: int = 0, size: int = 224, jpeg_quality: int = 92
) -> Path:
    """Write ``per_class`` JPEGs per class under ``out_dir`` (atomically; cached by options)."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    if not 32 <= size <= MAX_SIZE:
        raise ValueError(f"size must be from 32 to {MAX_SIZE} pixels, got {size}")
    out_dir = Path(out_dir)
    options = {
        "generator": "leukemia.synthetic",
        "version": 1,
        "per_class": per_class,
        "seed": seed,
        "size": size,
        "jpeg_quality": jpeg_quality,
    }
    marker = out_dir / "synthetic.json"
    written = _read_options(marker)
    if written == options:
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # Never replaced, even when it is ours: files may have been added since.
        ours = isinstance(written, dict) and written.get("generator") == options["generator"]
        raise FileExistsError(
            f"{str(out_dir)!r} holds a synthetic dataset made with other options "
            f"({_differences(written, options)}); choose a new directory or remove it"
            if ours
            else f"{str(out_dir)!r} exists and is not a synthetic dataset; choose a new directory"
        )
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for class_name, (folder, _) in LAYOUT.items():
            (tmp / folder).mkdir(parents=True)
            for index in range(per_class):
                rgb, _ = make_image(seed, class_name, index, size)
                ok, jpeg = cv2.imencode(
                    ".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
                )
                (tmp / file_path(class_name, index)).write_bytes(jpeg.tobytes())
        (tmp / "synthetic.json").write_text(json.dumps(options, indent=2) + "\n")
        try:
            if out_dir.is_dir():
                out_dir.rmdir()  # empty (checked above)
            os.rename(tmp, out_dir)
        except OSError:
            if _read_options(marker) != options:  # not a concurrent twin that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _read_options(marker: Path):
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _differences(written: dict, wanted: dict) -> str:
    keys = sorted(k for k in wanted if written.get(k) != wanted[k])
    return ", ".join(f"{k} {written.get(k)!r}, now {wanted[k]!r}" for k in keys)
