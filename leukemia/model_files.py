"""A model's files are data, never code: ``weights.safetensors`` and ``model.json``.

The served model (``classifier/``), training's ``checkpoint/`` and a local copy hold the same
two files:

- ``weights.safetensors``: the state dict of the whole ``Classifier`` (backbone and head), read
  with ``safetensors`` (a header and raw tensors: nothing in it can run);
- ``model.json``: a ``ModelSpec``: ``{"model": timm name, "dropout", "num_classes", "classes",
  "mean", "std", "segmentation": SegmentationParams.to_dict(), "max_pixels", "temperature"}``,
  every value checked for type and range before use (``temperature``, the calibration fitted
  on the validation split, is 1.0 for files written before it existed).

The code that turns them into a model is the installed ``leukemia`` package; nothing here
imports MLflow or unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from . import images
from .data import CLASSES
from .model import Classifier, check_model_name, create_classifier, error_summary
from .segmentation import SegmentationParams

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "model.json"
# Where a pyfunc model keeps the two files: data/model (this format), artifacts/ (models logged
# before it, whose served_model.py is never run by leukemia).
MODEL_SUBFOLDERS = ("", "data/model", "artifacts")
# Largest files read: EfficientNet-B7's weights are about 260 MB; a spec is a few hundred bytes.
MAX_WEIGHTS_BYTES = 4 << 30
MAX_SPEC_BYTES = 1 << 20


class ModelFileError(ValueError):
    """A model folder is missing a file, or a file is corrupt or not what leukemia writes."""


def segmentation_params(values: dict | SegmentationParams) -> SegmentationParams:
    """``SegmentationParams`` from its ``to_dict()`` (the derived ``resolved_foreground`` is
    dropped); unknown keys raise."""
    if isinstance(values, SegmentationParams):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"segmentation must be an object, got {type(values).__name__}")
    names = {f.name for f in fields(SegmentationParams)}
    unknown = sorted(set(values) - names - {"resolved_foreground"})
    if unknown:
        raise ValueError(
            f"unknown segmentation keys {unknown}; expected some of {', '.join(sorted(names))}"
        )
    params = SegmentationParams(**{k: v for k, v in values.items() if k in names})
    if params.stain_norm != "none" and params.stain_reference is None:
        raise ValueError(
            f"segmentation has stain_norm {params.stain_norm} but no stain_reference; expected "
            "the reference preprocess fitted on the training split"
        )
    return params


def _number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


def _integer(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a classifier and preprocesses its input: the content of ``model.json``."""

    model: str
    dropout: float
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    segmentation: SegmentationParams
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    temperature: float = 1.0  # probabilities are softmax(logits / temperature)
    exposure_norm: bool = False  # model.Classifier's: each image's exposure undone first

    def __post_init__(self):
        if not isinstance(self.model, str):
            raise ValueError(f"model must be a timm model name, got {self.model!r}")
        check_model_name(self.model)  # only names timm lists: no hub or file references
        _number("dropout", self.dropout, 0.0, 0.999)
        _integer("num_classes", self.num_classes, 1, 100_000)
        if not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"classes must be strings, got {list(self.classes)!r}")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for {self.num_classes} outputs")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ValueError(f"{name} needs 3 values (RGB), got {list(values)}")
            for value in values:
                _number(name, value, 1e-6 if name == "std" else -10.0, 10.0)
        _integer("max_pixels", self.max_pixels, 1, 2**40)
        _number("temperature", self.temperature, 0.01, 100.0)
        if not isinstance(self.exposure_norm, bool):
            raise ValueError(f"exposure_norm must be true or false, got {self.exposure_norm!r}")
        object.__setattr__(self, "segmentation", segmentation_params(self.segmentation))
        for name in ("classes", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def for_classifier(
        cls,
        classifier: Classifier,
        *,
        model_name: str,
        dropout: float,
        mean: Sequence[float],
        std: Sequence[float],
        segmentation: dict | SegmentationParams,
        classes: Sequence[str] = CLASSES,
        max_pixels: int = images.DEFAULT_MAX_PIXELS,
        temperature: float = 1.0,
    ) -> ModelSpec:
        return cls(
            model=model_name,
            dropout=float(dropout),
            num_classes=classifier.head.out_features,
            classes=tuple(str(c) for c in classes),
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            segmentation=segmentation_params(segmentation),
            max_pixels=int(max_pixels),
            temperature=float(temperature),
            exposure_norm=bool(getattr(classifier, "exposure_norm", False)),
        )

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "dropout": self.dropout,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "segmentation": self.segmentation.to_dict(),
            "max_pixels": self.max_pixels,
            "temperature": self.temperature,
            "exposure_norm": self.exposure_norm,
        }

    @classmethod
    def from_json(cls, values) -> ModelSpec:
        expected = [f.name for f in fields(cls)]
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object with keys {expected}")
        # Absent from files written before calibration, and before exposure normalisation.
        optional = ("temperature", "exposure_norm")
        missing = [k for k in expected if k not in values and k not in optional]
        unknown = sorted(set(values) - set(expected))
        if missing or unknown:
            raise ValueError(
                f"lacks the keys {missing} or has unknown keys {unknown}; expected {expected}"
            )
        for name in ("classes", "mean", "std"):
            if not isinstance(values[name], list):
                raise ValueError(f"{name} must be a list, got {values[name]!r}")
        return cls(**values)


def write(folder: str | os.PathLike, classifier: Classifier, spec: ModelSpec) -> tuple[Path, Path]:
    """Write ``weights.safetensors`` and ``model.json`` into ``folder``; returns their paths."""
    from safetensors.torch import save_file

    if spec.num_classes != classifier.head.out_features:
        raise ValueError(
            f"{spec.num_classes} classes in the spec for a classifier with "
            f"{classifier.head.out_features} outputs"
        )
    weights, spec_path = Path(folder, WEIGHTS_FILE), Path(folder, SPEC_FILE)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(weights))
    spec_path.write_text(json.dumps(spec.to_json(), indent=2) + "\n", encoding="utf-8")
    return weights, spec_path


def find_folder(path: str | os.PathLike, source: str | None = None) -> Path:
    """The folder holding both files: ``path`` (or its folder, for a file) or one of the
    places a pyfunc model keeps them (``MODEL_SUBFOLDERS``)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    for sub in MODEL_SUBFOLDERS:
        candidate = folder / sub
        if (candidate / WEIGHTS_FILE).is_file() and (candidate / SPEC_FILE).is_file():
            return candidate
    found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
    raise ModelFileError(
        f"{source or str(path)!r} holds no {WEIGHTS_FILE} + {SPEC_FILE} (nor in "
        f"{', '.join(s for s in MODEL_SUBFOLDERS if s)}), found {found}; expected a model logged "
        "by leukemia train (classifier/ or checkpoint/)"
    )


def read_regular(path: str | os.PathLike, limit: int, where: str) -> bytes:
    """The bytes of ``path`` if it is a regular file (or a link to one) of at most ``limit``
    bytes. A FIFO, device or socket is refused without waiting on it (opened non-blocking, its
    type read from the open descriptor), and reading stops past ``limit``: a link to /dev/zero
    or a file still growing is refused, not read to the end."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise ModelFileError(f"{where} cannot be opened ({error_summary(error)})") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ModelFileError(f"{where} is not a regular file; expected a file leukemia wrote")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ModelFileError(
            f"{where} is larger than {limit} bytes; expected a file leukemia wrote"
        )
    return data


def copy_checked(source: str | os.PathLike, target: str | os.PathLike, limits: dict) -> Path:
    """Copy the folder ``source`` into the new folder ``target``: only the files ``limits``
    names (relative POSIX path -> largest size in bytes), each a regular file, read once with
    ``read_regular``. What is copied is what the caller then checks and loads, so a file
    changed in ``source`` afterwards changes nothing. Raises ``ModelFileError`` naming the
    first unexpected entry (a code folder, a pickle, a link to a folder, a FIFO)."""
    source, target = Path(source), Path(target)
    found = []
    for root, folders, files in os.walk(source, followlinks=False):
        for name in folders + files:
            path = Path(root, name)
            relative = path.relative_to(source).as_posix()
            if path.is_symlink() and path.is_dir():
                raise ModelFileError(f"{relative!r} in {str(source)!r} links to a folder")
            if name in files:
                found.append(relative)
            elif not any(allowed.startswith(relative + "/") for allowed in limits):
                raise ModelFileError(
                    f"{str(source)!r} holds a folder {relative!r} that leukemia does not write; "
                    f"expected only {sorted(limits)}"
                )
    unexpected = sorted(set(found) - set(limits))
    if unexpected:
        raise ModelFileError(
            f"{str(source)!r} holds {unexpected[:5]}, files leukemia does not write; expected "
            f"only {sorted(limits)}"
        )
    target.mkdir(mode=0o700)
    for relative in found:
        data = read_regular(source / relative, limits[relative], f"{relative} of {str(source)!r}")
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(data)
    return target


def read_spec(folder: str | os.PathLike, source: str | None = None) -> ModelSpec:
    path = Path(folder, SPEC_FILE)
    where = f"{SPEC_FILE} of {source or str(folder)!r}"
    raw = read_regular(path, MAX_SPEC_BYTES, where)
    try:
        values = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ModelFileError(f"{where} is not readable JSON ({error_summary(error)})") from None
    try:
        return ModelSpec.from_json(values)
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{where}: {error_summary(error)}") from None


def load(
    folder: str | os.PathLike, source: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Classifier, ModelSpec]:
    """The classifier (eval mode, on ``device``) and its spec from a folder holding both files."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    source = source or str(folder)
    spec = read_spec(folder, source)
    classifier = create_classifier(
        spec.model,
        num_classes=spec.num_classes,
        dropout=spec.dropout,
        pretrained="none",
        exposure_norm=spec.exposure_norm,
    )
    raw = read_regular(
        Path(folder, WEIGHTS_FILE), MAX_WEIGHTS_BYTES, f"{WEIGHTS_FILE} of {source!r}"
    )
    try:
        state = load_tensors(raw)
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(
            f"{WEIGHTS_FILE} of {source!r} is not a readable safetensors file "
            f"({error_summary(error)})"
        ) from None
    try:
        classifier.load_state_dict(state)
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        raise ModelFileError(
            f"{WEIGHTS_FILE} of {source!r} does not fit a {spec.model} with "
            f"{spec.num_classes} classes: {error_summary(error)[:300]}"
        ) from None
    return classifier.to(device).eval(), spec
