"""Grad-CAM on the classifier's last feature map, and a figure of it for a few images per class
(what ``evaluate`` logs as ``evaluation/gradcam.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure

from .data import read_manifest
from .evaluation import LeukemiaModel, batch_tensor, model_input, read_raw
from .model import Classifier


def _head(classifier: Classifier, features: torch.Tensor) -> torch.Tensor:
    # The backbone's own pooling (global average for the EfficientNets): the logits are the
    # model's by construction, whichever pooling a timm backbone uses.
    return classifier.head(classifier.dropout(classifier.backbone.forward_head(features)))


def features_and_logits(classifier: Classifier, x: torch.Tensor):
    """``Classifier.forward`` split at the last feature map: ``(A, logits)`` with
    A = backbone.forward_features(x) of shape (B, C, h, w) and logits = head(pool(A))."""
    features = classifier.backbone.forward_features(x)
    return features, _head(classifier, features)


def _grad_cam(model: LeukemiaModel, rgb: np.ndarray, target: int | None):
    """(cam S x S in [0, 1], the S x S x 3 model input, probabilities (C,))."""
    image = model_input(model, rgb)
    classifier = model.classifier
    with torch.inference_mode(False), torch.enable_grad():
        x = batch_tensor(model, [image])
        with torch.no_grad():  # only dlogit/dA is needed: no graph through the backbone
            features = classifier.backbone.forward_features(x)
        if features.ndim != 4:
            raise ValueError(
                f"Grad-CAM needs a convolutional backbone whose forward_features gives "
                f"(B, C, h, w); {model.spec.model} gives shape {tuple(features.shape)}"
            )
        features = features.detach().requires_grad_(True)
        logits = _head(classifier, features)
        classes = logits.shape[1]
        target = int(logits.argmax()) if target is None else int(target)
        if not 0 <= target < classes:
            raise ValueError(f"target must be a class index in [0, {classes}), got {target}")
        (gradient,) = torch.autograd.grad(logits[0, target], features)
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # alpha_c = mean over h, w of dy/dA_c
    cam = torch.relu((weights * features.detach()).sum(dim=1))[0].float().cpu().numpy()
    size = model.image_size
    cam = cv2.resize(cam, (size, size), interpolation=cv2.INTER_LINEAR)
    top = float(cam.max())
    cam = np.clip(cam / top, 0.0, 1.0) if top > 0 else np.zeros_like(cam)
    probabilities = torch.softmax(logits.detach().double(), dim=1)[0].cpu().numpy()
    return cam, image, probabilities


def grad_cam(model: LeukemiaModel, rgb: np.ndarray, target: int | None = None) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of class ``target`` (default: the predicted one).

    With A (C, h, w) the backbone's last feature map and y the target logit:
    alpha_c = mean_ij dy/dA_cij, cam = ReLU(sum_c alpha_c A_c), bilinearly upsampled to the
    model input size S and divided by its maximum. Returns S x S float32 in [0, 1] (all zeros
    when no location supports the class).
    """
    return _grad_cam(model, rgb, target)[0]


def overlay(model: LeukemiaModel, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model input (S x S x 3 uint8) and the Grad-CAM of the predicted class blended over
    it in the jet colour map, as ``gradcam_figure`` draws it."""
    cam, image, _ = _grad_cam(model, rgb, None)
    heat = cv2.applyColorMap(np.uint8(np.rint(cam * 255)), cv2.COLORMAP_JET)[..., ::-1]
    return image, np.uint8(np.rint(0.55 * image + 0.45 * heat))


def gradcam_figure(model: LeukemiaModel, samples: Sequence[tuple[np.ndarray, int]]) -> Figure:
    """One row per true class: for each ``(raw rgb, label)`` of it, the model input and the
    Grad-CAM of the predicted class over it, titled with true and predicted class."""
    if not samples:
        raise ValueError("samples must hold at least one (rgb, label) pair, got none")
    by_class: dict[int, list[np.ndarray]] = {}
    for rgb, label in samples:
        by_class.setdefault(int(label), []).append(rgb)
    classes = model.classes
    n_rows, n_cols = len(by_class), 2 * max(len(v) for v in by_class.values())
    fig = Figure(figsize=(1.9 * n_cols, 2.2 * n_rows + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for row, label in enumerate(sorted(by_class)):
        for k, rgb in enumerate(by_class[label]):
            cam, image, probabilities = _grad_cam(model, rgb, None)
            predicted = int(probabilities.argmax())
            left, right = axes[row, 2 * k], axes[row, 2 * k + 1]
            left.imshow(image)
            left.set_title(f"true: {classes[label]}", fontsize=8)
            right.imshow(image)
            right.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            right.set_title(
                f"pred: {classes[predicted]} ({probabilities[predicted]:.2f})",
                fontsize=8,
                color="black" if predicted == label else "red",
            )
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Model input and Grad-CAM of the predicted class (red: wrong)", fontsize=10)
    return fig


def gradcam_samples(
    manifest_path: Path, root: Path, split: str, model: LeukemiaModel, per_class: int
):
    """The first ``per_class`` raw images of each class in the split, in manifest order."""
    rows = [r for r in read_manifest(manifest_path) if r["split"] == split]
    samples = []
    for label, name in enumerate(model.classes):
        for row in [r for r in rows if r["class"] == name][:per_class]:
            samples.append((read_raw(root, row, int(model.max_pixels)), label))
    return samples
