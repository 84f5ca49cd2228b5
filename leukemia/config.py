"""Experiment configuration: dataclass defaults (the paper) -> experiment YAML -> overrides.

Two frozen dataclasses declare every setting, each once: ``TrainConfig`` (the model and its
training) and ``PreprocessConfig`` (what changes the images a model sees). An experiment YAML
holds their fields at the top level, or preprocessing's in a ``preprocess:`` block; overrides
(``--field VALUE`` on the command line, ``-P field=value`` under ``mlflow run``, a search
trial's values) set any field by name. One config of each comes out and is logged whole.
Unknown keys are an error that lists the valid ones. Nothing else declares a setting: the
command-line help and the MLproject's parameters are read from these dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import images, yamlfile
from .preprocess import MAX_UNREADABLE
from .segmentation import CHANNELS, FOREGROUNDS, KERNEL_SHAPES, STAIN_NORMS, SegmentationParams
from .split import GROUP_BY, SplitParams

_SEGMENTATION = SegmentationParams()  # the paper's operator, declared in segmentation.py

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_EXPOSURE_JITTER = 3.0  # exposure factors within x/ 4 at most

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
    # Data (paper: batch 8; the 224 x 224 resize is preprocessing's, PreprocessConfig).
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
    # Not the paper's: colour jitter of strength s in training (exposure, contrast, saturation,
    # gamma within 1 +/- s, hue within +/- s/4 of a turn), 0 = off; the colour-jitter arm's.
    colour_jitter: float = 0.0
    # Not the paper's: each image's exposure scaled to one level inside the network, in
    # training and wherever the model is used (model.Classifier); the exposure-norm arm's.
    exposure_norm: bool = False
    # Not the paper's: each training image's exposure multiplied by a factor drawn log-uniform
    # in [1/(1+e), 1+e] and clipped at white, so over-exposure and the saturated background it
    # brings are common draws, not a rare edge of colour jitter; 0 = off; the exposure-aug arm's.
    exposure_jitter: float = 0.0
    # Run.
    # auto: bf16 autocast on CUDA (fp16 where bf16 is unsupported) and on CPUs with native
    # bf16 (AVX512-BF16/AMX), else fp32. Not a choice the paper made; it only changes speed.
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0
    seed: int = 42

    def __post_init__(self):
        _positive = ("batch_size", "phase1_epochs")
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
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.colour_jitter < 1:  # NaN fails too
            raise ValueError(f"colour_jitter must be in [0, 1), got {self.colour_jitter}")
        if not 0 <= self.exposure_jitter <= MAX_EXPOSURE_JITTER:  # NaN fails too
            raise ValueError(
                f"exposure_jitter must be in [0, {MAX_EXPOSURE_JITTER}], got {self.exposure_jitter}"
            )
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


def _setting(default, help: str):
    """A field with the one line of help every command-line listing shows for it."""
    return field(default=default, metadata={"help": help})


_SPLIT = SplitParams()  # the paper's split, declared in split.py


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes the images a model sees, declared once: the experiment YAML's
    ``preprocess:`` block (or top-level keys of these names), ``--field VALUE`` on every command
    that preprocesses and ``-P field=value`` under ``mlflow run`` all set these fields; the
    defaults are the libraries' (``SegmentationParams``, ``SplitParams``): the paper's."""

    image_size: int = _setting(_SEGMENTATION.image_size, "Images are resized to this square side.")
    # Segmentation (paper: gray Otsu, cells as foreground, 5 x 5 ellipse closing, gray inside).
    segment: bool = _setting(
        _SEGMENTATION.segment,
        "true: the paper's segmented images (proposed arm); false: resized RGB (baseline arm).",
    )
    channel: str = _setting(
        _SEGMENTATION.channel, f"Channel Otsu thresholds: {', '.join(CHANNELS)}."
    )
    foreground: str = _setting(
        _SEGMENTATION.foreground,
        f"Which side of t* is foreground ({', '.join(FOREGROUNDS)}); auto: the stained cells "
        "(dark in gray, bright in saturation and lab-a); 'bright' in gray is the paper's text.",
    )
    kernel_size: int = _setting(
        _SEGMENTATION.kernel_size, "Side of the closing's structuring element (odd)."
    )
    kernel_shape: str = _setting(
        _SEGMENTATION.kernel_shape, f"Shape of the structuring element: {', '.join(KERNEL_SHAPES)}."
    )
    output: str = _setting(
        _SEGMENTATION.output,
        "masked: gray with background 0; mask: the closed mask as 0/255; masked-rgb: the "
        "original colours inside the mask, background 0; gray: the whole grayscale image.",
    )
    stain_norm: str = _setting(
        _SEGMENTATION.stain_norm,
        f"{', '.join(STAIN_NORMS)}; reinhard: each resized image's LAB statistics matched to "
        "a reference fitted on the training split and stored with the model (not the paper's).",
    )
    # Split (paper: 70/15/15; duplicates always kept in one split).
    split_fractions: str = _setting(
        ",".join(f"{f:g}" for f in _SPLIT.fractions), "train,val,test fractions (sum to 1)."
    )
    split_seed: int = _setting(_SPLIT.seed, "Seed of the split (--seed seeds training).")
    group_by: str = _setting(
        _SPLIT.group_by,
        f"{' or '.join(GROUP_BY)}; image: the paper's split (duplicates still kept together); "
        "index-block: runs of block_size consecutive file numbers stay together.",
    )
    block_size: int = _setting(_SPLIT.block_size, "File numbers per pseudo-patient block.")
    near_duplicate_distance: int = _setting(
        _SPLIT.near_duplicate_distance,
        "Largest dHash Hamming distance (of 64 bits) counted near-duplicate.",
    )
    # Input checks.
    max_unreadable: float = _setting(
        MAX_UNREADABLE, "Fail when more than this fraction of image files is unreadable."
    )
    max_pixels: int = _setting(
        images.DEFAULT_MAX_PIXELS, "Larger images are skipped as unreadable (decompression bombs)."
    )

    def __post_init__(self):
        # The libraries' own checks, in one place each.
        self.segmentation()
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

    def segmentation(self) -> SegmentationParams:
        return SegmentationParams(
            image_size=self.image_size,
            segment=self.segment,
            channel=self.channel,
            foreground=self.foreground,
            kernel_size=self.kernel_size,
            kernel_shape=self.kernel_shape,
            output=self.output,
            stain_norm=self.stain_norm,
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
            f"config file {str(path)!r} {yamlfile.not_a_file(path)}; expected an experiment YAML "
            f"such as {DEFAULT_CONFIG} or {PAPER_CONFIG}"
        )
    try:
        loaded = yamlfile.load(path, f"config file {str(path)!r}") or {}
    except OSError as error:
        raise ValueError(f"config file {str(path)!r} cannot be read: {error.strerror}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value")
    return loaded


def _layered(cls, layers: list[dict]):
    """``cls`` from its defaults and each mapping of its fields in turn."""
    types = {f.name: type(f.default) for f in fields(cls)}
    values: dict = {}
    for layer in layers:
        for key, value in layer.items():
            values[key] = _coerce(key, value, types[key])
    return cls(**values)


TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))
PREPROCESS_FIELDS = tuple(f.name for f in fields(PreprocessConfig))


def split_fields(values: dict, source: str) -> tuple[dict, dict]:
    """``values`` as (``TrainConfig`` fields, ``PreprocessConfig`` fields), each key going to the
    dataclass that declares it; an unknown key raises, listing the valid ones."""
    if not isinstance(values, dict):
        raise ValueError(f"{source} must be a mapping of field: value")
    unknown = sorted(set(values) - set(TRAIN_FIELDS) - set(PREPROCESS_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown} in {source}; valid keys: "
            f"{', '.join(TRAIN_FIELDS + PREPROCESS_FIELDS)}"
        )
    train = {k: v for k, v in values.items() if k in TRAIN_FIELDS}
    return train, {k: v for k, v in values.items() if k in PREPROCESS_FIELDS}


def load_experiment(
    path: str | os.PathLike | None = None, overrides: dict | None = None
) -> tuple[TrainConfig, PreprocessConfig]:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (``--field VALUE``,
    ``-P field=value``, a search trial's values); validated. A key names a field of either
    dataclass, wherever it is given: the YAML's top level and its ``preprocess:`` block are one
    namespace (a field in both is an error)."""
    loaded = _read_yaml(path) if path is not None else {}
    where = f"config file {str(path)!r}"
    # The slurm: block is where a study's jobs run, not what a model sees (slurm_block).
    top = {k: v for k, v in loaded.items() if k not in ("preprocess", "slurm")}
    block = loaded.get("preprocess") or {}
    train_top, preprocess_top = split_fields(top, where)
    block_train, block_preprocess = split_fields(block, f"the preprocess block of {str(path)!r}")
    if block_train:
        raise ValueError(
            f"the preprocess block of {str(path)!r} holds training fields {sorted(block_train)}; "
            "put them at the top level"
        )
    twice = sorted(set(preprocess_top) & set(block_preprocess))
    if twice:
        raise ValueError(
            f"{twice} given both at the top level and in the preprocess block of {where}"
        )
    train_given, preprocess_given = split_fields(overrides or {}, "the overrides")
    train = _layered(TrainConfig, [train_top, train_given])
    preprocess = _layered(
        PreprocessConfig, [{**preprocess_top, **block_preprocess}, preprocess_given]
    )
    return train, preprocess


def slurm_block(path: str | os.PathLike | None) -> dict:
    """The ``slurm:`` block of the experiment YAML at ``path`` (resources of each train job)."""
    block = (_read_yaml(path) if path is not None else {}).get("slurm") or {}
    if not isinstance(block, dict):
        raise ValueError(f"the slurm block of {str(path)!r} must be a mapping of key: value")
    return block


def load_config(
    path: str | os.PathLike | None = None, overrides: dict | None = None
) -> TrainConfig:
    """The training half of ``load_experiment``."""
    return load_experiment(path, overrides)[0]
