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
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields
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


class Diverged(ValueError):
    """The training loss stopped being a number (a learning rate far too large)."""


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


def make_optimizer(classifier: m.Classifier, phase: Phase, config: TrainConfig):
    """Freeze what ``phase`` does not train, then a fresh AdamW over the trainable parameters
    only, per phase (as Keras recompiles)."""
    set_trainable(classifier, phase)
    return torch.optim.AdamW(
        m.trainable_parameters(classifier), lr=phase.lr, weight_decay=config.weight_decay
    )


def _save_atomically(state: dict, path: Path) -> None:
    """``state`` at ``path`` whole, or the previous file untouched. Written through a Python
    file, so a full disk is an OSError (ENOSPC: one line from any command) rather than
    torch's RuntimeError, and the temporary is removed whatever stopped the write."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, RuntimeError) and isinstance(error.__context__, OSError):
            # torch's zip writer, closing after the write failed, hides the OSError behind its
            # own "unexpected pos" RuntimeError.
            raise error.__context__ from None
        raise


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
        config.model,
        num_classes=len(CLASSES),
        dropout=config.dropout,
        pretrained=config.pretrained,
        exposure_norm=config.exposure_norm,
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


def loader_options(config: TrainConfig, device: torch.device) -> dict:
    """What every loader of a run shares (the benchmark's too)."""
    return {
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": config.num_workers > 0,
    }


@dataclass
class Loaders:
    """A run's loaders; they yield uint8 images, and normalisation and augmentation run on the
    batch, on the device (``BatchTransform``), so loader workers only decode."""

    train: DataLoader
    val: DataLoader
    test: DataLoader | None  # None: a search, which must choose on validation only
    order: torch.Generator  # the training loader's shuffle, part of a resumable state


def build_loaders(
    config: TrainConfig, processed_dir, device: torch.device, chunk: int, evaluate_test: bool
) -> Loaders:
    train_set = ManifestDataset(processed_dir, "train", in_memory=True)
    check_training_split(train_set.labels)
    order = torch.Generator().manual_seed(config.seed)
    options = loader_options(config, device)
    # Evaluation is in inference mode: an image's prediction does not depend on its batch.
    evaluation = {**options, "batch_size": max(config.batch_size, chunk)}
    return Loaders(
        train=DataLoader(train_set, shuffle=True, generator=order, **options),
        val=DataLoader(ManifestDataset(processed_dir, "val", in_memory=True), **evaluation),
        test=DataLoader(ManifestDataset(processed_dir, "test", in_memory=True), **evaluation)
        if evaluate_test
        else None,
        order=order,
    )


@dataclass
class Progress:
    """Where training stands; saved after every epoch (with the model, optimiser and RNGs) as
    the torchvision reference's checkpoint is, so a resume repeats the same numbers."""

    phase_index: int = 0
    epoch_in_phase: int = 0
    global_epoch: int = 0
    history: list = field(default_factory=list)
    best_val_loss: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    best_model: dict | None = None
    summary: dict = field(default_factory=dict)

    def as_dict(self) -> dict:  # not dataclasses.asdict: it would deep-copy the weights
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def stopped(self, phase: Phase, patience: int) -> bool:
        return self.epoch_in_phase >= phase.epochs or 0 < patience <= self.bad_epochs

    def record(self, record: dict, val_loss: float, classifier: m.Classifier) -> None:
        """Count an epoch; keep the model when its validation loss is the best so far."""
        self.epoch_in_phase += 1
        self.global_epoch += 1
        self.history.append(record)
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, self.global_epoch, 0
            self.best_model = copy.deepcopy(classifier.state_dict())
        else:
            self.bad_epochs += 1

    def next_phase(self, phase_index: int) -> None:
        self.phase_index, self.epoch_in_phase = phase_index + 1, 0
        self.bad_epochs, self.best_val_loss = 0, float("inf")


@dataclass
class Run:
    """One training run's resolved parts: what every epoch uses."""

    config: TrainConfig
    classifier: m.Classifier
    device: torch.device
    precision: engine.Precision
    loaders: Loaders
    augment: BatchTransform  # training batches: augmentation (and colour jitter), normalisation
    plain: BatchTransform  # evaluation batches: normalisation only
    augment_order: torch.Generator
    loss_fn: torch.nn.Module
    chunk: int
    state_path: Path
    progress: Progress = field(default_factory=Progress)

    def save(self, **extra) -> None:
        """The torchvision reference's checkpoint (model, optimizer, epoch in ``progress``) and
        the config it was made with, plus every RNG."""
        rng = _rng_state(self.loaders.order, self.augment_order)
        _save_atomically(
            {
                **self.progress.as_dict(),
                "model": self.classifier.state_dict(),
                "rng": rng,
                "config": self.config.to_dict(),
                **extra,
            },
            self.state_path,
        )

    def restore(self, saved: dict) -> None:
        self.classifier.load_state_dict(saved["model"])
        self.progress = Progress(**{f.name: saved[f.name] for f in fields(Progress)})

    def evaluate(self, loader: DataLoader, as_served: bool = False) -> dict:
        # As served: fp32. Under bf16 autocast a few borderline images can flip (2 of 325 in
        # one real-data run), so test metrics and calibration use fp32.
        precision = engine.Precision("fp32", self.device.type) if as_served else self.precision
        return engine.evaluate(
            self.classifier, loader, self.loss_fn, self.device, precision, self.plain
        )

    def fit_epoch(self, phase: Phase, optimizer) -> dict:
        description = f"epoch {self.progress.global_epoch + 1} ({phase.name})"
        if (
            phase.unfreeze_last is None
            and self.chunk > 0
            and m.deterministic(self.classifier.backbone)
        ):
            return engine.train_head_epoch(
                self.classifier, self.loaders.train, self.loss_fn, optimizer, self.device,
                self.precision, description, batch_transform=self.augment,
                chunk_batches=max(1, self.chunk // self.config.batch_size),
            )  # fmt: skip
        return engine.train_one_epoch(
            self.classifier, self.loaders.train, self.loss_fn, optimizer, self.device,
            self.config.freeze_bn_stats, self.precision, description=description,
            batch_transform=self.augment,
        )  # fmt: skip

    def run_phase(self, index: int, phase: Phase, optimizer, on_epoch) -> None:
        """Epochs of ``phase`` until its limit or early stopping; its best weights restored."""
        summary = self.progress.summary
        summary[f"{phase.name}_trainable_params"] = m.count_trainable(self.classifier)
        summary.setdefault(f"{phase.name}_start_epoch", self.progress.global_epoch + 1)
        while not self.progress.stopped(phase, self.config.patience):
            fit = self.fit_epoch(phase, optimizer)
            val = self.evaluate(self.loaders.val)
            for split, loss in (("training", fit["loss"]), ("validation", val["loss"])):
                if not math.isfinite(loss):
                    raise Diverged(
                        f"training diverged: the {split} loss of epoch "
                        f"{self.progress.global_epoch + 1} ({phase.name}) is {loss}; expected a "
                        f"finite loss: lower {phase.name}_lr ({phase.lr:g})"
                    )
            record = {
                "epoch": self.progress.global_epoch + 1,
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
            self.progress.record(record, val["loss"], self.classifier)
            # Report first, then save: a kill in between repeats this epoch's (identical)
            # record on resume rather than losing it.
            on_epoch(record)
            self.save(optimizer=optimizer.state_dict(), phase_index=index)
        self.classifier.load_state_dict(self.progress.best_model)
        summary[f"{phase.name}_best_epoch"] = self.progress.best_epoch


def prepare(
    config: TrainConfig,
    processed_dir,
    work_dir: Path,
    classifier: m.Classifier | None,
    device: torch.device | None,
    precision: engine.Precision | None,
    chunk: int | None,
    evaluate_test: bool,
) -> Run:
    """Resolve what ``train`` was not given, on the device, in a fixed order (the seeds)."""
    device = device or resolve_device(config.device)
    precision = precision or engine.resolve_precision(config.precision, device)
    seed_everything(config.seed)
    if classifier is None:
        classifier = build_classifier(config, stored_options(processed_dir)["image_size"])
    classifier = classifier.to(device)
    if precision.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    chunk = chunk_images(device) if chunk is None else chunk
    loaders = build_loaders(config, processed_dir, device, chunk, evaluate_test)
    mean, std = normalisation(classifier)
    augment_order = torch.Generator().manual_seed(config.seed + 1)
    augment = BatchTransform(
        mean,
        std,
        augment=True,
        generator=augment_order,
        colour=config.colour_jitter,
        exposure=config.exposure_jitter,
    )
    labels = loaders.train.dataset.labels
    weights = class_weights(labels).to(device) if config.class_weights else None
    return Run(
        config, classifier, device, precision, loaders, augment.to(device),
        BatchTransform(mean, std).to(device), augment_order,
        torch.nn.CrossEntropyLoss(weight=weights), chunk, Path(work_dir) / STATE_FILE,
    )  # fmt: skip


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
    run = prepare(config, processed_dir, work_dir, classifier, device, precision, chunk,
                  evaluate_test)  # fmt: skip
    saved = load_state(work_dir) if resume else None
    if saved is not None:
        run.restore(saved)
    for index, phase in enumerate(phases(config)):
        if index < run.progress.phase_index:
            continue  # finished before the interruption
        optimizer = make_optimizer(run.classifier, phase, config)
        if saved is not None and saved["phase_index"] == index:
            if saved["optimizer"]:  # empty when the run stopped between two phases
                optimizer.load_state_dict(saved["optimizer"])
            _set_rng_state(saved["rng"], run.loaders.order, run.augment_order)
            saved = None
        run.run_phase(index, phase, optimizer, on_epoch)
        test = run.evaluate(run.loaders.test, as_served=True) if run.loaders.test else None
        on_phase_end(phase, run.classifier, run.progress.summary, test)
        run.progress.next_phase(index)
        run.save(optimizer={})
    mean, std = normalisation(run.classifier)
    return {
        "model": run.classifier,
        "history": run.progress.history,
        "summary": run.progress.summary,
        "device": str(run.device),
        "precision": run.precision.name,
        "mean": mean,
        "std": std,
        # The final model on the validation split, as served (fp32): what calibration fits.
        "validation": run.evaluate(run.loaders.val, as_served=True),
    }
