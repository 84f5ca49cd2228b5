"""Figures for runs and reports (matplotlib ``Figure`` objects, no pyplot state): training
curves, confusion matrix, reliability diagram, the comparison of arms."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .data import CLASSES
from .metrics import (
    ECE_BINS,
    calibration_bins,
    checked_labels_and_probabilities,
    expected_calibration_error,
)

_CURVE_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def curves_figure(history: list[dict], phase2_start_epoch: int | None = None) -> Figure:
    """Accuracy and loss per epoch, train and validation, in two panels (the paper's Figs. 4-7).

    A dashed line between the last head-only epoch and ``phase2_start_epoch`` marks where
    fine-tuning starts.
    """
    if not history:
        raise ValueError("history must hold at least one epoch record, got none")
    missing = sorted({k for record in history for k in _CURVE_KEYS if k not in record})
    if missing:
        raise ValueError(f"history records must have keys {_CURVE_KEYS}, missing {missing}")
    epochs = [record["epoch"] for record in history]
    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, quantity in zip(fig.subplots(1, 2), ("accuracy", "loss")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [record[f"{split}_{quantity}"] for record in history]
            ax.plot(epochs, values, style, markersize=3, label=f"{split} {quantity}")
        if phase2_start_epoch is not None:
            ax.axvline(
                phase2_start_epoch - 0.5, color="gray", linestyle="--", label="fine-tuning starts"
            )
        ax.set(xlabel="epoch", ylabel=quantity, title=quantity.capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_figure(confusion, class_names=CLASSES, normalized=None) -> Figure:
    """Heat map of a C x C confusion matrix (rows true, columns predicted), counts in the cells.

    With ``normalized`` (row fractions) the colour shows the row fraction and each cell also
    gives it as a percentage, so classes of different sizes read on one scale.
    """
    counts = np.asarray(confusion)
    n_classes = len(class_names)
    if counts.shape != (n_classes, n_classes):
        raise ValueError(
            f"confusion must have shape ({n_classes}, {n_classes}) to match class_names, "
            f"got {counts.shape}"
        )
    shade = counts if normalized is None else np.asarray(normalized, dtype=np.float64)
    if shade.shape != counts.shape:
        raise ValueError(f"normalized must have shape {counts.shape}, got {shade.shape}")
    fig = Figure(figsize=(1.4 * n_classes + 2, 1.2 * n_classes + 1.5), layout="constrained")
    ax = fig.subplots()
    ax.imshow(shade, cmap="Blues", vmin=0)
    threshold = shade.max() / 2 if shade.size else 0
    for i in range(n_classes):
        for j in range(n_classes):
            text = f"{int(counts[i, j])}"
            if normalized is not None:
                text += f"\n{100 * shade[i, j]:.1f}%"
            color = "white" if shade[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", color=color)
    ticks = np.arange(n_classes)
    ax.set_xticks(ticks, class_names, rotation=30, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    return fig


def reliability_figure(labels, probabilities, bins: int = ECE_BINS) -> Figure:
    """Accuracy per top-1 confidence bin against the diagonal of perfect calibration."""
    labels, probabilities = checked_labels_and_probabilities(labels, probabilities)
    counts, _, accuracy = calibration_bins(labels, probabilities, bins)
    ece = expected_calibration_error(labels, probabilities, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    filled = counts > 0
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.bar(edges[:-1][filled], accuracy[filled], width=1 / bins, align="edge", edgecolor="black")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.set_title(f"Reliability (ECE = {ece:.4f})")
    ax.legend(loc="upper left")
    return fig


def comparison_figure(table: dict[str, list[float]], metric_name: str) -> Figure:
    """One column per arm: each seed's value as a point, the mean with +/- 1 sd error bars."""
    if not table or any(len(values) == 0 for values in table.values()):
        raise ValueError("table must map at least one arm to a non-empty list of per-seed values")
    fig = Figure(figsize=(1.5 * len(table) + 2, 4), layout="constrained")
    ax = fig.subplots()
    for x, values in enumerate(table.values()):
        values = np.asarray(values, dtype=np.float64)
        # Spread the seeds sideways (deterministically) so equal values stay visible.
        offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(x + offsets, values, color="tab:blue", alpha=0.6, zorder=2)
        sd = values.std(ddof=1) if len(values) > 1 else 0.0
        ax.errorbar(x + 0.3, values.mean(), yerr=sd, fmt="D", color="black", capsize=4, zorder=3)
    ax.set_xticks(range(len(table)), list(table), rotation=20, ha="right")
    ax.set(ylabel=metric_name, title=f"{metric_name} per arm (points: seeds; mean ± sd)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def difference_figure(pooled: dict[str, dict]) -> Figure:
    """One row per pair ``A_vs_B``: the mean-over-seeds accuracy difference A - B with its 95%
    interval; the dashed line at 0 is no difference."""
    if not pooled:
        raise ValueError("pooled must hold at least one pair")
    fig = Figure(figsize=(7, 0.5 * len(pooled) + 1.5), layout="constrained")
    ax = fig.subplots()
    names = [pair.replace("_vs_", " − ") for pair in pooled]
    for y, result in enumerate(pooled.values()):
        low, high = result["difference"] - result["low"], result["high"] - result["difference"]
        colour = "tab:green" if result["low"] > 0 else "tab:red" if result["high"] < 0 else "gray"
        ax.errorbar(result["difference"], y, xerr=[[low], [high]], fmt="o", color=colour, capsize=4)
    ax.axvline(0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel="test accuracy difference (mean over seeds, 95% interval)")
    ax.grid(axis="x", alpha=0.3)
    return fig
