"""Torch side of the data: a Dataset over a preprocessed manifest, augmentation, class weights.

Kept apart from data.py so that ``preprocess`` and its worker processes never import torch.
"""

from __future__ import annotations

import csv
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from . import images
from .data import CLASSES, SPLITS, DatasetError

# Decoded splits held in memory up to this size (the whole release at 224 px: about 330 MB).
IN_MEMORY_LIMIT_BYTES = 4 << 30


class ManifestDataset(Dataset):
    """The images of one split of a ``preprocess`` output folder.

    Item: (float tensor 3 x S x S after ``transform``, integer label). Images are read from
    ``images/...png`` as uint8 RGB (segmented ones as three identical channels). With
    ``in_memory`` the split is decoded once, on threads, into one uint8 N x 3 x S x S tensor
    (while it fits ``IN_MEMORY_LIMIT_BYTES``), so an epoch decodes no PNG: the same pixels,
    read faster.
    """

    def __init__(
        self, out_dir: str | os.PathLike, split: str, transform=None, in_memory: bool = False
    ):
        if split not in SPLITS:
            raise ValueError(f"unsupported split, got {split!r}; expected one of {SPLITS}")
        self.out_dir = Path(out_dir)
        manifest = self.out_dir / "manifest.csv"
        if not manifest.is_file():
            raise DatasetError(f"{str(manifest)!r} does not exist; run leukemia preprocess first")
        with manifest.open(newline="", encoding="utf-8") as handle:
            self.rows = [r for r in csv.DictReader(handle) if r["split"] == split]
        if not self.rows:
            raise DatasetError(f"no {split} images in {str(manifest)!r}")
        self.labels = [int(r["label"]) for r in self.rows]
        self.transform = transform
        self.decoded = self._decode_all() if in_memory else None

    def _read(self, index: int) -> torch.Tensor:
        rgb = images.read_png(self.out_dir / self.rows[index]["processed"])
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)

    def _decode_all(self) -> torch.Tensor | None:
        first = self._read(0)
        if first.numel() * len(self.rows) > IN_MEMORY_LIMIT_BYTES:
            return None  # too large to hold: read from disk per item
        decoded = torch.empty((len(self.rows), *first.shape), dtype=torch.uint8)
        decoded[0] = first

        def fill(index: int) -> None:
            decoded[index] = self._read(index)

        # PNG decoding (OpenCV) releases the GIL: threads use every core.
        with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
            list(pool.map(fill, range(1, len(self.rows))))
        return decoded

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        tensor = self.decoded[index] if self.decoded is not None else self._read(index)
        if self.transform is not None:
            tensor = self.transform(tensor)
        return tensor, self.labels[index]


def build_transform(train: bool, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """One uint8 CHW image -> normalised float CHW; ``train`` adds the paper's augmentation.

    The per-image face of ``BatchTransform`` (one implementation of the augmentation): training
    itself applies it to whole batches on the device. Validation and test images, and the
    served model's inputs, go through ``train=False``: scale to [0, 1], then normalise.
    """
    if not train:
        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    batch = BatchTransform(mean, std, augment=True)
    return lambda image: batch(image.unsqueeze(0))[0]


class BatchTransform(torch.nn.Module):
    """uint8 N x 3 x S x S batch (on any device) -> normalised float batch; with ``augment``,
    the Keras ImageDataGenerator augmentation drawn per image and applied to the whole batch
    in one ``grid_sample`` call.

    Doing this on the batch, on the training device, is what keeps the loader ahead of the
    model on a GPU: the loader workers only decode PNGs, and uint8 crosses the bus (4x less
    than float). The settings are the paper's: rotation within +/-15 degrees, shifts within
    10% of width and height, zoom within 10% (Keras draws x and y zoom independently),
    horizontal and vertical flips, edges filled with the nearest pixel (Keras' default
    ``fill_mode``). The random draws come from ``generator`` (on the CPU), so a seed fixes
    them on every device and a resumed run continues the same sequence.

    ``colour`` > 0 adds colour jitter after the geometry (not the paper's; the ``colour-jitter``
    arm): per image, exposure, contrast and saturation factors in [1 - colour, 1 + colour], a
    gamma in the same range and a hue shift within +/- colour / 4 of a turn, applied by
    torchvision's own functions (``colour_jitter``), so that a model cannot lean on the
    scanner's exposure or the stain batch's hue.

    ``exposure`` = e > 0 then multiplies each image's exposure by a factor drawn log-uniform in
    [1/(1+e), 1+e] (``exposure_factors``; torchvision's ``adjust_brightness``, which clips at
    white), so over-exposure, with the saturated background it brings, is a common draw (at
    e = 0.8, one image in five is brightened by more than 1.4) rather than the edge of one of
    five jitter factors. Neither draws from ``generator`` when off, so runs without them keep
    their sequence.
    """

    def __init__(
        self,
        mean,
        std,
        augment: bool = False,
        generator: torch.Generator | None = None,
        colour: float = 0.0,
        exposure: float = 0.0,
    ):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        if not 0 <= colour < 1:
            raise ValueError(f"colour jitter must be in [0, 1), got {colour}")
        self.augment = augment
        self.generator = generator
        self.colour = float(colour)
        if not exposure >= 0:
            raise ValueError(f"exposure jitter must be >= 0, got {exposure}")
        self.exposure = float(exposure)

    def affine(self, n: int) -> torch.Tensor:
        """N x 2 x 3 matrices mapping output to input coordinates (``affine_grid``'s way)."""
        g = self.generator

        def uniform(low, high):
            return torch.rand(n, generator=g) * (high - low) + low

        angle = torch.deg2rad(uniform(-15.0, 15.0))
        zoom_x, zoom_y = uniform(0.9, 1.1), uniform(0.9, 1.1)
        shift_x, shift_y = uniform(-0.2, 0.2), uniform(-0.2, 0.2)  # 10% of width in [-1, 1]
        flip_x = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        flip_y = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        # input = R(angle) @ diag(zoom_x * flip_x, zoom_y * flip_y) @ output + shift
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos * zoom_x * flip_x, -sin * zoom_y * flip_y, shift_x], 1),
                torch.stack([sin * zoom_x * flip_x, cos * zoom_y * flip_y, shift_y], 1),
            ],
            1,
        )
        return theta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        if self.augment:
            theta = self.affine(len(x)).to(x.device)
            grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
            x = torch.nn.functional.grid_sample(
                x, grid, mode="bilinear", padding_mode="border", align_corners=False
            )
            if self.colour > 0:
                x = colour_jitter(x, colour_factors(len(x), self.colour, self.generator))
            if self.exposure > 0:
                x = expose(x, exposure_factors(len(x), self.exposure, self.generator))
        return (x - self.mean) / self.std


def colour_factors(n: int, strength: float, generator: torch.Generator | None = None) -> dict:
    """Per-image colour-jitter factors (each an (n,) CPU tensor) for ``colour_jitter``:
    brightness, contrast, saturation and gamma uniform in [1 - s, 1 + s], hue uniform in
    [-s/4, s/4] (fractions of a turn; torchvision's range is +/- 0.5)."""

    def uniform(low, high):
        return torch.rand(n, generator=generator) * (high - low) + low

    s = float(strength)
    return {
        "brightness": uniform(1 - s, 1 + s),
        "contrast": uniform(1 - s, 1 + s),
        "saturation": uniform(1 - s, 1 + s),
        "hue": uniform(-s / 4, s / 4),
        "gamma": uniform(1 - s, 1 + s),
    }


# torchvision's functions, in the order ColorJitter's documentation lists them, then exposure's
# gamma: the colour maths is torchvision's, this module only draws the factors.
_COLOUR_STEPS = (
    ("brightness", v2.functional.adjust_brightness),
    ("contrast", v2.functional.adjust_contrast),
    ("saturation", v2.functional.adjust_saturation),
    ("hue", v2.functional.adjust_hue),
    ("gamma", v2.functional.adjust_gamma),
)


def colour_jitter(x: torch.Tensor, factors: dict) -> torch.Tensor:
    """float N x 3 x H x W batch in [0, 1] -> the same with image i's factors (``colour_factors``)
    applied by torchvision's adjust functions, one image at a time (each has its own factors;
    a batch of a few dozen costs little next to the network)."""
    out = []
    for i, image in enumerate(x):
        for name, adjust in _COLOUR_STEPS:
            image = adjust(image, float(factors[name][i]))
        out.append(image)
    return torch.stack(out) if out else x


def exposure_factors(
    n: int, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image exposure factors (an (n,) CPU tensor) log-uniform in [1/(1+e), 1+e]: as
    likely to halve the light as to double it."""
    bound = math.log1p(float(strength))
    return torch.exp(torch.rand(n, generator=generator) * (2 * bound) - bound)


def expose(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """float N x 3 x H x W batch in [0, 1] -> image i's intensities times ``factors[i]``,
    clipped at white (torchvision's ``adjust_brightness``)."""
    out = [v2.functional.adjust_brightness(image, float(f)) for image, f in zip(x, factors)]
    return torch.stack(out) if out else x


def class_weights(labels, num_classes: int = len(CLASSES)) -> torch.Tensor:
    """w_c = N / (n_c * C) from the training labels (scikit-learn's 'balanced' weights)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    missing = [
        CLASSES[c] if num_classes == len(CLASSES) else c for c in np.flatnonzero(counts == 0)
    ]
    if missing:
        raise DatasetError(f"class(es) {missing} have no training images; cannot weight them")
    return torch.tensor(len(labels) / (counts * num_classes), dtype=torch.float32)
