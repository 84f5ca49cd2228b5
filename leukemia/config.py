"""Experiment configuration: dataclass defaults (the paper) -> experiment YAML -> overrides.

An experiment YAML holds ``TrainConfig`` fields at the top level and, optionally, a
``preprocess:`` mapping of ``PreprocessConfig`` fields. One frozen config of each comes out and
is logged whole. Unknown keys are an error that lists the valid ones. These dataclasses are the
only place a default is declared: the command-line options and the MLproject parameters leave
a value unset ("") to take it from here (tests/test_config.py checks that they do).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from . import images, yamlfile
from .preprocess import SplitParams
from .segmentation import MAX_IMAGE_SIZE, SegmentationParams

_SEGMENTATION = SegmentationParams()  # the paper's operator, declared in segmentation.py

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# What every command and MLproject entry point runs when no --config is given: the demo, minutes
# on a CPU with nothing to download. The dataclass defaults below are the paper's values, which
# experiments/paper.yaml states with their sources.
DEFAULT_CONFIG = "experiments/demo.yaml"
PAPER_CONFIG = "experiments/paper.yaml"
_CHECKOUT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TrainConfig:
    # Model (paper: ImageNet EfficientNetB4 + GAP + Dropout(0.4) + Dense softmax).
    model: str = "efficientnet_b4"
    pretrained: str = "imagenet"  # imagenet | none | path to a local state dict
    dropout: float = 0.4
    # Data (paper: 224 x 224, batch 8).
    image_size: int = 224
    batch_size: int = 8
    # Optimiser (paper: AdamW, lr 1e-4, weight decay 1e-4, constant rate, both phases).
    phase1_lr: float = 1e-4
    phase2_lr: float = 1e-4
    weight_decay: float = 1e-4
    # Phases (paper: head up to 50 epochs, then the last 60 layers up to 30).
    phase1_epochs: int = 50
    phase2_epochs: int = 30
    unfreeze_last: int = 60
    freeze_bn_stats: bool = True  # Keras calls the base model in inference mode
    patience: int = 7  # early stopping on validation loss, best weights restored
    class_weights: bool = True  # w_c = N / (n_c * C)
    # Run.
    # auto: bf16 autocast on CUDA (fp16 where bf16 is unsupported) and on CPUs with native
    # bf16 (AVX512-BF16/AMX), else fp32. Not a choice the paper made; it only changes speed.
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0
    seed: int = 42

    def __post_init__(self):
        _positive = ("image_size", "batch_size", "phase1_epochs")
        for name in _positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("phase2_epochs", "unfreeze_last", "patience", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("phase1_lr", "phase2_lr"):
            if not 0 < getattr(self, name) < math.inf:  # NaN fails too
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be at most {MAX_IMAGE_SIZE}, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unsupported precision, got {self.precision!r}; expected one of {PRECISIONS}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(
                f"unsupported device, got {self.device!r}; expected auto, cpu, cuda or cuda:N"
            )
        if not self.model.strip():
            raise ValueError("model must name a timm model, got an empty string")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything preprocessing decides besides the image size (``TrainConfig.image_size``)."""

    # Segmentation (paper: gray Otsu, cells as foreground, 5 x 5 ellipse closing, gray inside).
    segment: bool = _SEGMENTATION.segment  # false: the baseline arm's resized RGB images
    channel: str = _SEGMENTATION.channel  # gray | saturation | lab-a
    foreground: str = _SEGMENTATION.foreground  # auto | dark | bright
    kernel_size: int = _SEGMENTATION.kernel_size
    kernel_shape: str = _SEGMENTATION.kernel_shape  # ellipse | rect | cross
    output: str = _SEGMENTATION.output  # masked | mask
    # Split (paper: 70/15/15; duplicates always kept in one split).
    split_fractions: str = "0.7,0.15,0.15"
    split_seed: int = 42
    group_by: str = "image"  # image | index-block
    block_size: int = 24
    near_duplicate_distance: int = 4
    # Input checks.
    max_unreadable: float = 0.01
    max_pixels: int = images.DEFAULT_MAX_PIXELS

    def __post_init__(self):
        # The libraries' own checks, in one place each.
        self.segmentation(224)
        self.split()
        if not 0 <= self.max_unreadable <= 1:
            raise ValueError(f"max_unreadable must be in [0, 1], got {self.max_unreadable}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.split_seed < 0:
            raise ValueError(f"split_seed must be >= 0, got {self.split_seed}")

    def split(self) -> SplitParams:
        return SplitParams(
            fractions=self.split_fractions,
            seed=self.split_seed,
            group_by=self.group_by,
            block_size=self.block_size,
            near_duplicate_distance=self.near_duplicate_distance,
        )

    def segmentation(self, image_size: int) -> SegmentationParams:
        return SegmentationParams(
            image_size=image_size,
            segment=self.segment,
            channel=self.channel,
            foreground=self.foreground,
            kernel_size=self.kernel_size,
            kernel_shape=self.kernel_shape,
            output=self.output,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(name: str, value, target_type):
    """Turn a YAML value or a ``-P key=value`` string into the field's type, or raise."""
    if target_type is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
    elif target_type is str:
        if isinstance(value, str):
            return value
    elif not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and target_type is float:
            return number
        if number is not None and number.is_integer():
            return int(number)
    raise ValueError(f"{name} must be {target_type.__name__}, got {value!r}")


def resolve_config_path(path: str | os.PathLike) -> Path:
    """``path`` as given; a relative one that the working directory lacks is looked up in the
    checkout the package runs from, so ``experiments/demo.yaml`` works from any folder."""
    given = Path(path)
    if given.is_file() or given.is_absolute():
        return given
    in_checkout = _CHECKOUT / given
    return in_checkout if in_checkout.is_file() else given


def _read_yaml(path: str | os.PathLike) -> dict:
    path = resolve_config_path(path)
    if not path.is_file():
        raise ValueError(
            f"config file {str(path)!r} does not exist; expected an experiment YAML such as "
            f"{DEFAULT_CONFIG} or {PAPER_CONFIG}"
        )
    try:
        loaded = yamlfile.load(path, f"config file {str(path)!r}") or {}
    except OSError as error:
        raise ValueError(f"config file {str(path)!r} cannot be read: {error.strerror}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value")
    return loaded


def _layered(cls, layers: list[tuple[str, dict]]):
    """``cls`` from its defaults and each (source, mapping) layer in turn."""
    types = {f.name: type(f.default) for f in fields(cls)}
    values: dict = {}
    for source, layer in layers:
        if not isinstance(layer, dict):
            raise ValueError(f"{source} must be a mapping of field: value")
        unknown = sorted(set(layer) - set(types))
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown} in {source}; valid keys: {', '.join(types)}"
            )
        for key, value in layer.items():
            values[key] = _coerce(key, value, types[key])
    return cls(**values)


def load_experiment(
    path: str | os.PathLike | None = None,
    overrides: dict | None = None,
    preprocess_overrides: dict | None = None,
) -> tuple[TrainConfig, PreprocessConfig]:
    """Defaults, then the YAML file at ``path`` (if any), then the overrides; validated."""
    loaded = _read_yaml(path) if path is not None else {}
    train_layer = {k: v for k, v in loaded.items() if k != "preprocess"}
    train = _layered(
        TrainConfig, [(f"config file {str(path)!r}", train_layer), ("overrides", overrides or {})]
    )
    preprocess = _layered(
        PreprocessConfig,
        [
            (f"the preprocess block of {str(path)!r}", loaded.get("preprocess") or {}),
            ("preprocessing options", preprocess_overrides or {}),
        ],
    )
    return train, preprocess


def load_config(
    path: str | os.PathLike | None = None, overrides: dict | None = None
) -> TrainConfig:
    """The training half of ``load_experiment``."""
    return load_experiment(path, overrides)[0]
