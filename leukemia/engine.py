"""One training epoch and one evaluation pass: plain PyTorch, no MLflow, no CLI."""

from __future__ import annotations

import time

import torch
from torch import nn

from .model import Classifier, set_train_mode


def train_one_epoch(
    model: Classifier,
    loader,
    loss_fn: nn.Module,
    optimizer,
    device="cpu",
    freeze_bn_stats: bool = True,
) -> dict:
    """Train for one pass over ``loader``; returns loss, accuracy, seconds and images/s."""
    set_train_mode(model, freeze_bn_stats)
    start, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / seen,
        "accuracy": correct / seen,
        "seconds": seconds,
        "images_per_second": seen / seconds,
    }


@torch.inference_mode()
def evaluate(model: Classifier, loader, loss_fn: nn.Module, device="cpu") -> dict:
    """Loss and accuracy over ``loader``, with the labels and softmax probabilities."""
    model.eval()
    total_loss, labels_all, probabilities = 0.0, [], []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
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
