"""The paper's two-phase training, resumable after any interruption.

Phases are data (``Phase``): which part of the backbone trains, at what rate, for how many
epochs. Each phase stops early on validation loss and restores its best weights; phase 2
starts from phase 1's best. After every epoch the whole state (model, optimiser, early
stopping, every RNG, history) is written atomically to ``state.pt``, so a killed run resumes
from its last completed epoch and ends with the same numbers as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import engine
from . import model as m
from .config import TrainConfig
from .datasets import ManifestDataset, build_transform, class_weights

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    lr: float
    unfreeze_last: int | None  # None: the whole backbone frozen (head only)


def phases(config: TrainConfig) -> list[Phase]:
    plan = [Phase("phase1", config.phase1_epochs, config.phase1_lr, None)]
    if config.phase2_epochs > 0:
        plan.append(Phase("phase2", config.phase2_epochs, config.phase2_lr, config.unfreeze_last))
    return plan


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _configure(classifier: m.Classifier, phase: Phase, config: TrainConfig):
    if phase.unfreeze_last is None:
        m.freeze_backbone(classifier)
    else:
        m.unfreeze_last(classifier, phase.unfreeze_last)
    # A fresh AdamW over the trainable parameters only, per phase (as Keras recompiles).
    return torch.optim.AdamW(
        m.trainable_parameters(classifier), lr=phase.lr, weight_decay=config.weight_decay
    )


def _save_atomically(state: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _rng_state(loader_generator: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
    }


def _set_rng_state(state: dict, loader_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])


def train(
    config: TrainConfig,
    processed_dir,
    work_dir,
    on_epoch: Callable[[dict], None] = lambda record: None,
    on_phase_end: Callable[[Phase, m.Classifier, dict], None] = lambda *a: None,
    resume: bool = False,
) -> dict:
    """Train on ``processed_dir`` (a preprocess output); state lives in ``work_dir``.

    ``on_epoch`` receives each epoch's record (global ``epoch``, phase, train/val metrics, lr);
    ``on_phase_end`` the phase, the model with its best weights restored, and the phase summary.
    Returns the summary: trained model, history, best epochs, trainable parameter counts.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    classifier = m.create_classifier(
        config.model, num_classes=4, dropout=config.dropout, pretrained=config.pretrained
    ).to(device)
    # Normalise as the backbone was pretrained (timm's pretrained config).
    mean, std = (
        classifier.backbone.pretrained_cfg["mean"],
        classifier.backbone.pretrained_cfg["std"],
    )
    train_set = ManifestDataset(processed_dir, "train", build_transform(True, mean, std))
    val_set = ManifestDataset(processed_dir, "val", build_transform(False, mean, std))
    weights = class_weights(train_set.labels) if config.class_weights else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=config.num_workers,
    )
    val_loader = DataLoader(val_set, batch_size=config.batch_size, num_workers=config.num_workers)

    state = {
        "phase_index": 0,
        "epoch_in_phase": 0,
        "global_epoch": 0,
        "history": [],
        "best_val_loss": float("inf"),
        "best_epoch": 0,
        "bad_epochs": 0,
        "best_model": None,
        "summary": {},
    }
    state_path = work_dir / STATE_FILE
    saved = None
    if resume and state_path.is_file():
        saved = torch.load(state_path, map_location=device, weights_only=False)
        classifier.load_state_dict(saved["model"])
        state = {k: saved[k] for k in state}

    plan = phases(config)
    for phase_index in range(state["phase_index"], len(plan)):
        phase = plan[phase_index]
        optimizer = _configure(classifier, phase, config)
        if saved is not None and saved["phase_index"] == phase_index:
            if saved["optimizer"]:  # empty when the run stopped between two phases
                optimizer.load_state_dict(saved["optimizer"])
            _set_rng_state(saved["rng"], generator)
            saved = None
        summary = state["summary"]
        summary[f"{phase.name}_trainable_params"] = m.count_trainable(classifier)
        summary.setdefault(f"{phase.name}_start_epoch", state["global_epoch"] + 1)
        while state["epoch_in_phase"] < phase.epochs and (
            config.patience == 0 or state["bad_epochs"] < config.patience
        ):
            fit = engine.train_one_epoch(
                classifier, train_loader, loss_fn, optimizer, device, config.freeze_bn_stats
            )
            val = engine.evaluate(classifier, val_loader, loss_fn, device)
            state["epoch_in_phase"] += 1
            state["global_epoch"] += 1
            record = {
                "epoch": state["global_epoch"],
                "phase": phase.name,
                "train_loss": fit["loss"],
                "train_accuracy": fit["accuracy"],
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "lr": phase.lr,
                "epoch_seconds": fit["seconds"],
                "images_per_second": fit["images_per_second"],
            }
            state["history"].append(record)
            if val["loss"] < state["best_val_loss"]:
                state.update(
                    best_val_loss=val["loss"],
                    best_epoch=state["global_epoch"],
                    bad_epochs=0,
                    best_model=copy.deepcopy(classifier.state_dict()),
                )
            else:
                state["bad_epochs"] += 1
            # Report first, then save: a kill in between repeats this epoch's (identical)
            # record on resume rather than losing it.
            on_epoch(record)
            _save_atomically(
                {
                    **state,
                    "model": classifier.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(generator),
                    "phase_index": phase_index,
                },
                state_path,
            )
        classifier.load_state_dict(state["best_model"])
        summary[f"{phase.name}_best_epoch"] = state["best_epoch"]
        on_phase_end(phase, classifier, summary)
        state.update(
            phase_index=phase_index + 1, epoch_in_phase=0, bad_epochs=0, best_val_loss=float("inf")
        )
        _save_atomically(
            {
                **state,
                "model": classifier.state_dict(),
                "optimizer": {},
                "rng": _rng_state(generator),
            },
            state_path,
        )
    return {
        "model": classifier,
        "history": state["history"],
        "summary": state["summary"],
        "device": str(device),
    }
