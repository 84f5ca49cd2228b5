"""Torch side of the data: a Dataset over a preprocessed manifest, augmentation, class weights.

Kept apart from data.py so that ``preprocess`` and its worker processes never import torch.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from . import images
from .data import CLASSES, SPLITS, DatasetError


class ManifestDataset(Dataset):
    """The images of one split of a ``preprocess`` output folder.

    Item: (float tensor 3 x S x S after ``transform``, integer label). Images are read from
    ``images/...png`` as uint8 RGB (segmented ones as three identical channels).
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, transform=None):
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

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        rgb = images.read_png(self.out_dir / self.rows[index]["processed"])
        tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        if self.transform is not None:
            tensor = self.transform(tensor)
        return tensor, self.labels[index]


def build_transform(train: bool, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """uint8 CHW tensor -> normalised float tensor; ``train`` adds the paper's augmentation.

    The Keras ImageDataGenerator settings: rotation within +/-15 degrees, shifts within 10% of
    width and height, zoom within 10%, horizontal and vertical flips. Validation and test
    images are never augmented.
    """
    steps = []
    if train:
        steps += [
            v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1)),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
        ]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]
    return v2.Compose(steps)


def class_weights(labels, num_classes: int = len(CLASSES)) -> torch.Tensor:
    """w_c = N / (n_c * C) from the training labels (scikit-learn's 'balanced' weights)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    missing = [
        CLASSES[c] if num_classes == len(CLASSES) else c for c in np.flatnonzero(counts == 0)
    ]
    if missing:
        raise DatasetError(f"class(es) {missing} have no training images; cannot weight them")
    return torch.tensor(len(labels) / (counts * num_classes), dtype=torch.float32)
