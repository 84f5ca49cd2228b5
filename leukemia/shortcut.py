"""The shortcut arm: what global colour and brightness statistics alone achieve.

On this dataset the four classes differ visibly in overall stain colour and brightness, so a
linear model on a few histogram bins may come close to the deep model. This module measures
that on the same preprocessed images the deep model sees (a ``leukemia preprocess`` folder):
per-image features, a standardised logistic regression fit on ``train``, its inverse
regularisation strength C chosen on ``val``, probabilities on ``test``.

No torch and no MLflow here: the caller logs ``ShortcutResult`` wherever it likes.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import VarianceThreshold
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from . import images, segmentation
from .data import CLASSES, SPLITS, DatasetError, read_manifest

KINDS = ("rgb", "gray", "background")
RGB_BINS = 16  # per channel: 3 x 16 bins + 3 means + 3 sds = 54 features
GRAY_BINS = 32  # 32 bins + mean + sd = 34 features
MAX_ITER = 2000
# Constant features named in a warning before the list is summarised.
_NAMES_SHOWN = 8


class ShortcutWarning(UserWarning):
    """The shortcut fit ran, but on less than it was given (constant features, no convergence)."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unsupported feature kind, got {kind!r}; expected one of {KINDS}")


def feature_names(kind: str) -> list[str]:
    """Column names of ``features(..., kind)``: ``r_hist_00`` .. ``b_sd`` or ``gray_hist_00`` .."""
    _check_kind(kind)
    if kind in ("rgb", "background"):
        hists = [f"{c}_hist_{b:02d}" for c in "rgb" for b in range(RGB_BINS)]
        names = hists + [f"{c}_mean" for c in "rgb"] + [f"{c}_sd" for c in "rgb"]
        return names if kind == "rgb" else [f"bg_{n}" for n in names] + ["bg_fraction"]
    return [f"gray_hist_{b:02d}" for b in range(GRAY_BINS)] + ["gray_mean", "gray_sd"]


def _histogram(plane: np.ndarray, bins: int) -> np.ndarray:
    """Fraction of the pixels of one uint8 plane in each of ``bins`` equal bins over 0..255."""
    counts = cv2.calcHist([np.ascontiguousarray(plane)], [0], None, [bins], [0, 256]).ravel()
    return counts.astype(np.float64) / plane.size


def _gray(image: np.ndarray) -> np.ndarray:
    """H x W uint8 brightness; a segmented image's three identical channels give one of them."""
    if image.ndim == 2:
        return image
    red, green, blue = image[:, :, 0], image[:, :, 1], image[:, :, 2]
    if np.array_equal(red, green) and np.array_equal(green, blue):
        return red
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def features(rgb: np.ndarray, kind: str) -> np.ndarray:
    """Global colour or brightness statistics of one image, as a float64 vector.

    ``rgb``: H x W x 3 uint8 RGB (an H x W uint8 plane counts as three identical channels).

    - ``"rgb"`` (54 values): for each channel c in R, G, B the 16-bin histogram
      h_c[k] = #{pixels with k*16 <= v_c < (k+1)*16} / (H*W), then the channel means
      mean(v_c)/255, then the population standard deviations sd(v_c)/255.
    - ``"gray"`` (34 values): the same with 32 bins (width 8) on the luma
      Y = 0.299 R + 0.587 G + 0.114 B (OpenCV's RGB2GRAY), then mean(Y)/255 and sd(Y)/255.

    - ``"background"`` (55 values): the ``"rgb"`` statistics of the background only, the pixels
      outside the paper's closed Otsu mask (gray, cells dark, 5 x 5 ellipse: ``segmentation``),
      then the background's fraction of the image: what the class gives away where no cell is.

    Order as in ``feature_names(kind)``. Each histogram sums to 1 (0 for an empty background).
    """
    _check_kind(kind)
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        got = rgb.dtype if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected a uint8 image array, got {got}")
    if not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)) or rgb.size == 0:
        raise ValueError(f"expected an H x W x 3 RGB (or H x W gray) image, got shape {rgb.shape}")
    if kind == "gray":
        gray = _gray(rgb)
        mean, sd = cv2.meanStdDev(gray)
        return np.concatenate([_histogram(gray, GRAY_BINS), mean.ravel() / 255, sd.ravel() / 255])
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    rgb = np.ascontiguousarray(rgb)
    if kind == "background":
        return _background_features(rgb)
    hists = [_histogram(rgb[:, :, c], RGB_BINS) for c in range(3)]
    mean, sd = cv2.meanStdDev(rgb)
    return np.concatenate(hists + [mean.ravel() / 255, sd.ravel() / 255])


def _background_features(rgb: np.ndarray) -> np.ndarray:
    """``features(rgb, "background")``: the RGB statistics outside the paper's closed mask."""
    cells, _ = segmentation.otsu_mask(segmentation.to_gray(rgb), "dark")
    closed = segmentation.close_mask(cells, segmentation.structuring_element(5, "ellipse"))
    background = (~closed).astype(np.uint8)
    count = int(background.sum())
    if count == 0:
        return np.zeros(len(feature_names("background")))
    hists = [
        cv2.calcHist([rgb[:, :, c]], [0], background, [RGB_BINS], [0, 256]).ravel() / count
        for c in range(3)
    ]
    mean, sd = cv2.meanStdDev(rgb, mask=background)
    fraction = np.array([count / background.size])
    return np.concatenate(hists + [mean.ravel() / 255, sd.ravel() / 255, fraction])


def load_split_features(
    processed_dir: str | os.PathLike, kind: str
) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """``{split: (X, y, paths)}`` for train, val and test of a ``leukemia preprocess`` folder.

    X: n x F float64 features of the processed PNGs; y: n integer labels (index in CLASSES,
    from the manifest's class column); paths: the manifest's ``path`` (original image, relative
    to the dataset root). Rows keep manifest order, the order ``ManifestDataset(split)`` uses,
    so test predictions line up with the deep model's. Raises DatasetError when a split is
    empty or an image cannot be read.
    """
    _check_kind(kind)
    processed_dir = Path(processed_dir)
    manifest = processed_dir / "manifest.csv"
    if not manifest.is_file():
        raise DatasetError(f"{str(manifest)!r} does not exist; run leukemia preprocess first")
    rows = read_manifest(manifest)
    if any(not row.get("processed") for row in rows):
        raise DatasetError(
            f"manifest {str(manifest)!r} lacks processed image paths; "
            f"expected the manifest.csv of a leukemia preprocess output folder"
        )
    width = len(feature_names(kind))
    result = {}
    for split in SPLITS:
        split_rows = [row for row in rows if row["split"] == split]
        if not split_rows:
            raise DatasetError(
                f"no {split} images in {str(manifest)!r}; the shortcut arm fits on train, "
                f"picks C on val and reports on test, so it needs all of {list(SPLITS)}"
            )
        X = np.empty((len(split_rows), width))
        for i, row in enumerate(split_rows):
            try:
                X[i] = features(images.read_png(processed_dir / row["processed"]), kind)
            except images.UnreadableImage as error:
                raise DatasetError(f"{error}; re-run leukemia preprocess") from None
        y = np.array([CLASSES.index(row["class"]) for row in split_rows], dtype=np.int64)
        result[split] = (X, y, [row["path"] for row in split_rows])
    return result


@dataclass
class ShortcutResult:
    kind: str
    C: float  # the chosen inverse regularisation strength
    pipeline: Pipeline  # fit on train; takes full feature vectors (constant ones are dropped)
    val_accuracy_by_C: dict[float, float]
    val_log_loss_by_C: dict[float, float]
    test_labels: np.ndarray  # n_test integer labels
    test_probabilities: np.ndarray  # n_test x 4, columns in CLASSES order
    test_paths: list[str]
    feature_names: list[str]  # the features the model uses
    dropped_features: list[str]  # constant over the training split
    seconds: float  # features and fits together


def _check_Cs(Cs) -> tuple[float, ...]:
    try:
        values = tuple(float(C) for C in Cs)
    except (TypeError, ValueError):
        raise ValueError(f"Cs must be a sequence of positive numbers, got {Cs!r}") from None
    if not values or any(not np.isfinite(C) or C <= 0 for C in values):
        raise ValueError(f"Cs must be a non-empty sequence of positive numbers, got {Cs!r}")
    return values


def _summarise(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _check_training_set(X: np.ndarray, y: np.ndarray, names: list[str], kind: str) -> list[str]:
    """Raise unless every class has training images and some feature varies; return constants."""
    missing = [CLASSES[c] for c in np.flatnonzero(np.bincount(y, minlength=len(CLASSES)) == 0)]
    if missing:
        raise DatasetError(
            f"class(es) {missing} have no training images; the shortcut arm needs all "
            f"{len(CLASSES)} ({list(CLASSES)})"
        )
    # Peak-to-peak, not variance: the same test VarianceThreshold(0) makes in the pipeline.
    constant = [name for name, ptp in zip(names, np.ptp(X, axis=0)) if ptp == 0]
    if len(constant) == len(names):
        raise DatasetError(
            f"every {kind} feature is constant over the training split ({len(X)} images); "
            f"are the processed images blank?"
        )
    return constant


def _make_pipeline(C: float, seed: int) -> Pipeline:
    return Pipeline(
        [
            ("drop_constant", VarianceThreshold(0.0)),
            ("scale", StandardScaler()),
            ("logreg", LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed)),
        ]
    )


def _probabilities(pipeline: Pipeline, X: np.ndarray) -> np.ndarray:
    """n x 4 probabilities in CLASSES order, whatever classes the model saw."""
    out = np.zeros((len(X), len(CLASSES)))
    out[:, pipeline.classes_] = pipeline.predict_proba(X)
    return out


def fit_shortcut(
    processed_dir: str | os.PathLike,
    kind: str = "rgb",
    Cs=(0.01, 0.1, 1.0, 10.0, 100.0),
    seed: int = 0,
) -> ShortcutResult:
    """Fit StandardScaler + LogisticRegression(C) on train for each C; keep the best on val.

    Best: highest validation accuracy; ties go to the lower validation log-loss (the better
    calibrated fit), then to the smaller C (stronger regularisation). The chosen pipeline is
    the one fit on train alone (no refit on train + val), so val stays a clean selector.
    Features constant over train are dropped (ShortcutWarning); a C whose solver stops at
    ``MAX_ITER`` iterations is named in a ShortcutWarning instead of sklearn's
    ConvergenceWarning.
    """
    _check_kind(kind)
    Cs = _check_Cs(Cs)
    start = time.perf_counter()
    data = load_split_features(processed_dir, kind)
    (X_train, y_train, _), (X_val, y_val, _), (X_test, y_test, test_paths) = (
        data[split] for split in SPLITS
    )
    names = feature_names(kind)
    constant = _check_training_set(X_train, y_train, names, kind)
    if constant:
        warnings.warn(
            ShortcutWarning(
                f"{len(constant)} of {len(names)} {kind} feature(s) are constant over the "
                f"training split and are dropped: {_summarise(constant)}"
            ),
            stacklevel=2,
        )
    fits, accuracy, loss, unconverged = {}, {}, {}, []
    for C in Cs:
        pipeline = _make_pipeline(C, seed)
        with warnings.catch_warnings():
            # Reported below from n_iter_, once for all Cs, with the C values named.
            warnings.simplefilter("ignore", ConvergenceWarning)
            pipeline.fit(X_train, y_train)
        if np.max(pipeline[-1].n_iter_) >= MAX_ITER:
            unconverged.append(C)
        probabilities = _probabilities(pipeline, X_val)
        fits[C] = pipeline
        accuracy[C] = float(accuracy_score(y_val, probabilities.argmax(axis=1)))
        loss[C] = float(log_loss(y_val, probabilities, labels=range(len(CLASSES))))
    if unconverged:
        warnings.warn(
            ShortcutWarning(
                f"LogisticRegression did not converge in {MAX_ITER} iterations for C in "
                f"{unconverged}; their validation scores may be understated"
            ),
            stacklevel=2,
        )
    best = min(Cs, key=lambda C: (-accuracy[C], loss[C], C))
    return ShortcutResult(
        kind=kind,
        C=best,
        pipeline=fits[best],
        val_accuracy_by_C=accuracy,
        val_log_loss_by_C=loss,
        test_labels=y_test,
        test_probabilities=_probabilities(fits[best], X_test),
        test_paths=test_paths,
        feature_names=[name for name in names if name not in constant],
        dropped_features=constant,
        seconds=time.perf_counter() - start,
    )
