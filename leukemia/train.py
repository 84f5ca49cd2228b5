"""The paper's two-phase training, resumable after any interruption.

Phases are data (``Phase``): which part of the backbone trains, at what rate, for how many
epochs. Each phase stops early on validation loss and restores its best weights; phase 2
starts from phase 1's best. After every epoch the whole state (model, optimiser, early
stopping, every RNG, history) is written atomically to ``state.pt``, so a killed run resumes
from its last completed epoch and ends with the same numbers as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import contextlib
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
from .data import CLASSES, DatasetError
from .datasets import BatchTransform, ManifestDataset, class_weights
from .preprocess import stored_options

STATE_FILE = "state.pt"
# Images per backbone pass in phase 1 (``engine.train_head_epoch``) and per evaluation batch:
# as many as speed favours on the device (benchmarks/train_speed.py measures them). Neither
# changes what the model learns, only how fast (up to float rounding), so neither is part of a
# run's identity; LEUKEMIA_CHUNK_IMAGES overrides it (smaller on a small GPU; 0: phase 1 runs
# the plain batch loop).
CHUNK_IMAGES = {"cuda": 256, "cpu": 32}
CHUNK_ENV = "LEUKEMIA_CHUNK_IMAGES"


def chunk_images(device: torch.device) -> int:
    text = os.environ.get(CHUNK_ENV, "").strip()
    if not text:
        return CHUNK_IMAGES.get(device.type, CHUNK_IMAGES["cpu"])
    if not text.isdigit():
        raise ValueError(f"{CHUNK_ENV} must be a whole number of images >= 0, got {text!r}")
    return int(text)


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
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return torch.device(device)


def hardware(device: torch.device) -> str:
    """What a run ran on, for reports: the accelerator's name, or the CPU's and its cores."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    cores = len(affinity(0)) if affinity else os.cpu_count()
    return f"{model or 'CPU'}, {cores} cores, {torch.get_num_threads()} threads"


def set_trainable(classifier: m.Classifier, phase: Phase) -> None:
    """Freeze what ``phase`` does not train: the whole backbone in phase 1, all but its last
    ``unfreeze_last`` Keras-counted layers in phase 2 (the benchmark uses it too)."""
    if phase.unfreeze_last is None:
        m.freeze_backbone(classifier)
    else:
        m.unfreeze_last(classifier, phase.unfreeze_last)


def _configure(classifier: m.Classifier, phase: Phase, config: TrainConfig):
    set_trainable(classifier, phase)
    # A fresh AdamW over the trainable parameters only, per phase (as Keras recompiles).
    return torch.optim.AdamW(
        m.trainable_parameters(classifier), lr=phase.lr, weight_decay=config.weight_decay
    )


def _save_atomically(state: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _rng_state(loader_generator: torch.Generator, augment_generator: torch.Generator) -> dict:
    # Only tensors, numbers, strings and tuples, so the checkpoint loads with weights_only=True.
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state(),
        "augment": augment_generator.get_state(),
    }


def _set_rng_state(
    state: dict, loader_generator: torch.Generator, augment_generator: torch.Generator
) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    loader_generator.set_state(state["loader"])
    augment_generator.set_state(state["augment"])


def load_state(work_dir) -> dict | None:
    """The last saved training state in ``work_dir``, or None when there is none."""
    path = Path(work_dir) / STATE_FILE
    if not path.is_file():
        return None
    # On the CPU: RNG states must be CPU tensors; load_state_dict copies weights to the model.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged file fails in many ways
        raise ValueError(
            f"the saved training state {str(path)!r} is damaged "
            f"({m.error_summary(error, first_sentence=True)}); this run cannot be resumed: start a "
            "new run"
        ) from None


def build_classifier(config: TrainConfig, image_size: int) -> m.Classifier:
    """The configured classifier, checked against the image size it will see (downloads
    ImageNet weights when asked, so a failure surfaces before any training or tracking
    starts)."""
    m.check_model_name(config.model)
    seed_everything(config.seed)  # the head's (and a from-scratch backbone's) initial weights
    classifier = m.create_classifier(
        config.model, num_classes=len(CLASSES), dropout=config.dropout, pretrained=config.pretrained
    )
    m.check_image_size(classifier.backbone, image_size)
    return classifier


def normalisation(classifier: m.Classifier) -> tuple[tuple, tuple]:
    """Mean and std the backbone was pretrained with (timm's pretrained config)."""
    cfg = classifier.backbone.pretrained_cfg
    return tuple(cfg["mean"]), tuple(cfg["std"])


def check_training_split(labels) -> None:
    counts = np.bincount(np.asarray(labels), minlength=len(CLASSES))
    missing = [CLASSES[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        raise DatasetError(
            f"class(es) {missing} have no training images; every class in {list(CLASSES)} "
            "needs some"
        )


def confusion_counts(labels: torch.Tensor, probabilities: torch.Tensor) -> list[list[int]]:
    """C x C counts, rows true class, columns the argmax prediction (C = probabilities.shape[1])."""
    n_classes = probabilities.shape[1]
    pairs = labels.long() * n_classes + probabilities.argmax(1)
    return torch.bincount(pairs, minlength=n_classes * n_classes).view(n_classes, -1).tolist()


def train(
    config: TrainConfig,
    processed_dir,
    work_dir,
    on_epoch: Callable[[dict], None] = lambda record: None,
    on_phase_end: Callable[[Phase, m.Classifier, dict, dict], None] = lambda *a: None,
    resume: bool = False,
    classifier: m.Classifier | None = None,
    device: torch.device | None = None,
    precision: engine.Precision | None = None,
    evaluate_test: bool = True,
    chunk: int | None = None,
) -> dict:
    """Train on ``processed_dir`` (a preprocess output); state lives in ``work_dir``.

    ``on_epoch`` receives each epoch's record (global ``epoch``, phase, train/val metrics, lr);
    ``on_phase_end`` the phase, the model with its best weights restored, the summary so far,
    and that model's test-split evaluation. ``classifier`` (from ``build_classifier``), ``device``
    and ``precision``, when the caller has resolved them, are not resolved again.
    ``evaluate_test=False`` (a search, which must choose on validation only) never opens the
    test split: ``on_phase_end`` gets None for it. ``chunk``: images per backbone pass in
    phase 1 and per evaluation batch (default ``chunk_images(device)``; 0: phase 1 runs the
    plain batch-by-batch loop, the reference the fast one is tested against). Returns the
    trained model, history, summary, device and precision.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = device or resolve_device(config.device)
    precision = precision or engine.resolve_precision(config.precision, device)
    as_served = engine.Precision("fp32", device.type)
    seed_everything(config.seed)
    if classifier is None:
        classifier = build_classifier(config, stored_options(processed_dir)["image_size"])
    classifier = classifier.to(device)
    if precision.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    mean, std = normalisation(classifier)
    # Loaders yield uint8 images; normalisation and augmentation run on the batch, on the
    # device (BatchTransform), so loader workers only decode.
    train_set = ManifestDataset(processed_dir, "train", in_memory=True)
    check_training_split(train_set.labels)
    val_set = ManifestDataset(processed_dir, "val", in_memory=True)
    augment_generator = torch.Generator().manual_seed(config.seed + 1)
    augment = BatchTransform(
        mean, std, augment=True, generator=augment_generator, colour=config.colour_jitter
    ).to(device)
    plain = BatchTransform(mean, std).to(device)
    weights = class_weights(train_set.labels) if config.class_weights else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    generator = torch.Generator().manual_seed(config.seed)
    loader_options = {
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": config.num_workers > 0,
    }
    train_loader = DataLoader(train_set, shuffle=True, generator=generator, **loader_options)
    chunk = chunk_images(device) if chunk is None else chunk
    # Evaluation is in inference mode: an image's prediction does not depend on its batch.
    eval_options = {**loader_options, "batch_size": max(config.batch_size, chunk)}
    val_loader = DataLoader(val_set, **eval_options)
    test_loader = (
        DataLoader(ManifestDataset(processed_dir, "test", in_memory=True), **eval_options)
        if evaluate_test
        else None
    )

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

    def save(**fields):
        # The torchvision reference's checkpoint: model, optimizer, epoch (in ``state``) and
        # the config it was made with; plus every RNG, so a resume repeats the same numbers.
        rng = _rng_state(generator, augment_generator)
        weights = classifier.state_dict()
        _save_atomically(
            {**state, "model": weights, "rng": rng, "config": config.to_dict(), **fields},
            state_path,
        )

    saved = load_state(work_dir) if resume else None
    if saved is not None:
        classifier.load_state_dict(saved["model"])
        state = {k: saved[k] for k in state}

    plan = phases(config)
    for phase_index in range(state["phase_index"], len(plan)):
        phase = plan[phase_index]
        optimizer = _configure(classifier, phase, config)
        if saved is not None and saved["phase_index"] == phase_index:
            if saved["optimizer"]:  # empty when the run stopped between two phases
                optimizer.load_state_dict(saved["optimizer"])
            _set_rng_state(saved["rng"], generator, augment_generator)
            saved = None
        summary = state["summary"]
        summary[f"{phase.name}_trainable_params"] = m.count_trainable(classifier)
        summary.setdefault(f"{phase.name}_start_epoch", state["global_epoch"] + 1)
        while state["epoch_in_phase"] < phase.epochs and (
            config.patience == 0 or state["bad_epochs"] < config.patience
        ):
            description = f"epoch {state['global_epoch'] + 1} ({phase.name})"
            if phase.unfreeze_last is None and chunk > 0 and m.deterministic(classifier.backbone):
                fit = engine.train_head_epoch(
                    classifier,
                    train_loader,
                    loss_fn,
                    optimizer,
                    device,
                    precision,
                    description,
                    batch_transform=augment,
                    chunk_batches=max(1, chunk // config.batch_size),
                )
            else:
                fit = engine.train_one_epoch(
                    classifier,
                    train_loader,
                    loss_fn,
                    optimizer,
                    device,
                    config.freeze_bn_stats,
                    precision,
                    description=description,
                    batch_transform=augment,
                )
            val = engine.evaluate(classifier, val_loader, loss_fn, device, precision, plain)
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
                "val_confusion": confusion_counts(val["labels"], val["probabilities"]),
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
            save(optimizer=optimizer.state_dict(), phase_index=phase_index)
        classifier.load_state_dict(state["best_model"])
        summary[f"{phase.name}_best_epoch"] = state["best_epoch"]
        on_phase_end(
            phase,
            classifier,
            summary,
            # Test metrics in fp32, as the served model predicts: under bf16 autocast a few
            # borderline images can flip (2 of 325 in one real-data run).
            engine.evaluate(classifier, test_loader, loss_fn, device, as_served, plain)
            if test_loader is not None
            else None,
        )
        state.update(
            phase_index=phase_index + 1, epoch_in_phase=0, bad_epochs=0, best_val_loss=float("inf")
        )
        save(optimizer={})
    return {
        "model": classifier,
        "history": state["history"],
        "summary": state["summary"],
        "device": str(device),
        "precision": precision.name,
        "mean": mean,
        "std": std,
        # The final model on the validation split, as served (fp32): what calibration fits.
        "validation": engine.evaluate(classifier, val_loader, loss_fn, device, as_served, plain),
    }
