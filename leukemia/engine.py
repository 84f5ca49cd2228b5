"""One training epoch and one evaluation pass: plain PyTorch, no MLflow, no CLI.

``Precision`` says how a step runs: autocast dtype (bf16 or fp16, None for fp32), a gradient
scaler for fp16, and channels-last memory on CUDA (faster convolutions with tensor cores).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .model import Classifier, set_train_mode


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16, resolved (never auto)
    device_type: str  # cpu | cuda

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def channels_last(self) -> bool:
        return self.device_type == "cuda"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        return torch.amp.GradScaler("cuda") if self.name == "fp16" else None


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``auto``: bf16 on CUDA GPUs that support it (else fp16) and on CPUs with native bf16
    instructions (else fp32). An explicit choice the device cannot run is an error."""
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            precision = "bf16" if native else "fp32"
    if precision == "fp16" and not cuda:
        raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on a CPU")
    return Precision(precision, device.type)


def _to_device(images, labels, device, precision: Precision, batch_transform=None):
    """Move a batch to ``device``; then ``batch_transform`` (uint8 -> normalised float, maybe
    augmented) runs there, and the result takes the precision's memory format."""
    images = images.to(device, non_blocking=True)
    if batch_transform is not None:
        images = batch_transform(images)
    if precision.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train_step(model, images, labels, loss_fn, optimizer, precision: Precision, scaler=None):
    """One optimisation step on a batch already on the device; returns (loss, correct)."""
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        logits = model(images)
    loss = loss_fn(logits.float(), labels)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.item(), (logits.argmax(1) == labels).sum().item()


def train_one_epoch(
    model: Classifier,
    loader,
    loss_fn: nn.Module,
    optimizer,
    device="cpu",
    freeze_bn_stats: bool = True,
    precision: Precision | None = None,
    description: str = "train",
    batch_transform=None,
) -> dict:
    """Train for one pass over ``loader``; returns loss, accuracy, seconds and images/s."""
    precision = precision or Precision("fp32", torch.device(device).type)
    scaler = precision.scaler()
    set_train_mode(model, freeze_bn_stats)
    bar = _bar(loader, description)

    def steps():
        for images, labels in bar:
            images, labels = _to_device(images, labels, device, precision, batch_transform)
            loss, hits = train_step(model, images, labels, loss_fn, optimizer, precision, scaler)
            yield loss, hits, len(labels)

    return _tally(steps(), bar)


def _bar(loader, description: str):
    # disable=None: a bar on a terminal only; in a log (mlflow run, CI) the epoch lines suffice.
    return tqdm(
        loader, desc=description, unit="batch", leave=False, dynamic_ncols=True, disable=None
    )


def _tally(steps, bar) -> dict:
    """Run ``steps`` (one (loss, correct, images) per optimiser step) into the epoch's loss,
    accuracy, seconds and images/s, with the bar's running figures."""
    start, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
    for loss, hits, n in steps:
        total_loss += loss * n
        correct += hits
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / seen,
        "accuracy": correct / seen,
        "seconds": seconds,
        "images_per_second": seen / seconds,
    }


def _groups(batches, size: int):
    """Consecutive groups of up to ``size`` items of ``batches``."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def train_head_epoch(
    model: Classifier,
    loader,
    loss_fn: nn.Module,
    optimizer,
    device="cpu",
    precision: Precision | None = None,
    description: str = "train",
    batch_transform=None,
    chunk_batches: int = 8,
) -> dict:
    """``train_one_epoch`` for a frozen backbone (phase 1), at about the cost of inference.

    A frozen backbone with BatchNorm in inference mode (and no stochastic depth) maps each image
    to the same features whatever else is in its batch. So the backbone runs once per chunk of
    ``chunk_batches`` consecutive loader batches, each batch moved and augmented alone as before
    (the same random draws, in the same order), and the head then takes one optimiser step per
    batch, in order, its dropout drawing from the same generator: the same training as
    ``train_one_epoch``, up to float rounding. The gain is on a GPU, where one small batch
    leaves the device mostly idle.
    """
    precision = precision or Precision("fp32", torch.device(device).type)
    scaler = precision.scaler()
    set_train_mode(model, freeze_bn_stats=True)
    if any(p.requires_grad for p in model.backbone.parameters()):
        raise ValueError("train_head_epoch needs a frozen backbone (phase 1)")
    bar = _bar(loader, description)

    def steps():
        moved = (_to_device(i, labels, device, precision, batch_transform) for i, labels in bar)
        for group in _groups(moved, chunk_batches):
            with torch.no_grad(), precision.autocast():
                features = model.features(torch.cat([images for images, _ in group]))
            sizes = [len(labels) for _, labels in group]
            for piece, (_, labels) in zip(features.split(sizes), group, strict=True):
                step = train_step(
                    model.classify, piece, labels, loss_fn, optimizer, precision, scaler
                )
                yield *step, len(labels)

    return _tally(steps(), bar)


@torch.inference_mode()
def evaluate(
    model: Classifier,
    loader,
    loss_fn: nn.Module,
    device="cpu",
    precision: Precision | None = None,
    batch_transform=None,
) -> dict:
    """Loss and accuracy over ``loader``, with the labels and softmax probabilities."""
    precision = precision or Precision("fp32", torch.device(device).type)
    model.eval()
    total_loss, labels_all, probabilities = 0.0, [], []
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, precision, batch_transform)
        with precision.autocast():
            logits = model(images)
        logits = logits.float()
        total_loss += loss_fn(logits, labels).item() * len(labels)
        labels_all.append(labels.cpu())
        probabilities.append(logits.softmax(1).cpu())
    labels_all, probabilities = torch.cat(labels_all), torch.cat(probabilities)
    return {
        "loss": total_loss / len(labels_all),
        "accuracy": (probabilities.argmax(1) == labels_all).float().mean().item(),
        "labels": labels_all,
        "probabilities": probabilities,
    }
