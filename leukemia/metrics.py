"""Test-set reports, calibration and paired statistics for a classifier: numpy in, numbers out.

Inputs are integer labels of shape (n,) and class probabilities of shape (n, C) (lists and CPU
tensors are accepted through ``np.asarray``). Nothing here imports torch or MLflow: the
engine produces the arrays, ``tracking`` logs what these functions return, and ``figures``
draws them.
"""

from __future__ import annotations

import re

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import (
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from .data import CLASSES, slug

BOOTSTRAP_METRICS = ("accuracy", "f1_macro")
ECE_BINS = 15
# Probabilities are clipped before the log so one confident mistake gives a large, finite loss.
_LOG_CLIP = 1e-12
# Resampled index matrices are built in blocks of at most this many entries (int64: 32 MB).
_BOOTSTRAP_BLOCK = 4_000_000
_METRIC_KEY = re.compile(r"^[A-Za-z0-9_]*$")

# ---------------------------------------------------------------------------------------------
# Validation

N_RESAMPLES = 1000  # bootstrap resamples every interval uses unless told otherwise


def _labels(labels, n_classes: int, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"{name} must lie in [0, {n_classes}), got values from {labels.min()} to {labels.max()}"
        )
    return labels.astype(np.int64)


def _probabilities(probabilities, n: int, n_classes: int) -> np.ndarray:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (n, n_classes):
        raise ValueError(
            f"probabilities must have shape (n, C) = ({n}, {n_classes}), got {probabilities.shape}"
        )
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities must be finite, got NaN or infinity")
    return probabilities


def checked_labels_and_probabilities(labels, probabilities, n_classes: int | None = None):
    """Validated ``(labels (n,), probabilities (n, C))``; C defaults to the probabilities' width."""
    if n_classes is None:
        shape = np.shape(probabilities)
        if len(shape) != 2:
            raise ValueError(f"probabilities must have shape (n, C), got {shape}")
        n_classes = shape[1]
    labels = _labels(labels, n_classes)
    return labels, _probabilities(probabilities, len(labels), n_classes)


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have equal lengths, got {lengths}")


def _check_bootstrap(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


# ---------------------------------------------------------------------------------------------
# Reports


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int):
    """Top-1 confidence binned into ``bins`` equal-width bins of [0, 1], (lo, hi] each.

    Returns ``(counts, mean_confidence, accuracy)``, each of shape (bins,); empty bins hold 0.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    inner_edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    index = np.digitize(confidence, inner_edges, right=True)
    counts = np.bincount(index, minlength=bins)
    safe = np.maximum(counts, 1)
    mean_confidence = np.bincount(index, confidence, minlength=bins) / safe
    accuracy = np.bincount(index, correct, minlength=bins) / safe
    return counts, mean_confidence, accuracy


def expected_calibration_error(labels, probabilities, bins: int = ECE_BINS) -> float:
    """ECE = sum_b (n_b / n) |accuracy_b - confidence_b| over equal-width confidence bins.

    Confidence is the top-1 probability and accuracy whether the top-1 class is the label.
    """
    labels, probabilities = checked_labels_and_probabilities(labels, probabilities)
    counts, mean_confidence, accuracy = calibration_bins(labels, probabilities, bins)
    return float(np.sum(counts / counts.sum() * np.abs(accuracy - mean_confidence)))


def brier_score(labels, probabilities) -> float:
    """Multi-class Brier score: the mean over images of sum_k (p_k - [y = k])^2 (0 is perfect,
    2 the worst), scikit-learn's ``brier_score_loss`` on one-hot labels times the classes."""
    labels, probabilities = checked_labels_and_probabilities(labels, probabilities)
    one_hot = np.eye(probabilities.shape[1])[labels]
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


def temperature_scaled(probabilities, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities the logits divided by ``temperature`` give (log p
    differs from the logits by a constant per row, which softmax ignores). (N, C) -> (N, C)."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-300, None))
    scaled = logits / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(labels, probabilities) -> float:
    """Temperature scaling (Guo et al., 2017): the T in ``TEMPERATURE_BOUNDS`` minimising the
    negative log-likelihood of ``temperature_scaled(probabilities, T)`` on held-out images (the
    validation split). One number: the predicted class never changes, only the confidence."""
    from scipy.optimize import minimize_scalar

    labels, probabilities = checked_labels_and_probabilities(labels, probabilities)
    # Softmax in float32 (training's evaluation) underflows to 0 past a logit gap of about 87;
    # log(0) clipped at 1e-300 would weigh such an image as a gap of 690.
    probabilities = np.clip(probabilities, np.finfo(np.float32).tiny, None)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        scaled = temperature_scaled(probabilities, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.clip(scaled[rows, labels], 1e-300, None))))

    low, high = np.log(TEMPERATURE_BOUNDS)
    found = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def calibration_summary(labels, probabilities, temperature: float) -> dict:
    """ECE and Brier score before and after temperature scaling, and the temperature."""
    scaled = temperature_scaled(probabilities, temperature)
    return {
        "temperature": float(temperature),
        "ece_uncalibrated": expected_calibration_error(labels, probabilities),
        "ece_calibrated": expected_calibration_error(labels, scaled),
        "brier_uncalibrated": brier_score(labels, probabilities),
        "brier_calibrated": brier_score(labels, scaled),
    }


def _one_vs_rest_auc(labels: np.ndarray, probabilities: np.ndarray, class_names) -> dict:
    # AUC is undefined when a class is absent from the labels or is every label.
    auc = {}
    for k, name in enumerate(class_names):
        positive = labels == k
        defined = positive.any() and not positive.all()
        auc[name] = float(roc_auc_score(positive, probabilities[:, k])) if defined else None
    return auc


def classification_metrics(labels, probabilities, class_names=CLASSES, loss=None) -> dict:
    """Everything the test report needs, from labels (n,) and probabilities (n, C).

    ``loss`` is the caller's loss when given (e.g. class-weighted cross-entropy), else the mean
    negative log-likelihood of the true class. Per-class dicts are keyed by class name; classes
    absent from ``labels`` still get a confusion-matrix row (zeros) and zero recall.
    """
    class_names = tuple(class_names)
    n_classes = len(class_names)
    labels, probabilities = checked_labels_and_probabilities(labels, probabilities, n_classes)
    predictions = probabilities.argmax(axis=1)
    classes = list(range(n_classes))
    if loss is None:
        true_class = probabilities[np.arange(len(labels)), labels]
        loss = -np.mean(np.log(np.clip(true_class, _LOG_CLIP, 1.0)))

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    counts = confusion_matrix(labels, predictions, labels=classes)
    row_sums = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
    report_args = dict(labels=classes, target_names=class_names, digits=4, zero_division=0)
    auc = _one_vs_rest_auc(labels, probabilities, class_names)
    defined_auc = [v for v in auc.values() if v is not None]

    def f1_average(average: str) -> float:
        return float(
            f1_score(labels, predictions, labels=classes, average=average, zero_division=0)
        )

    return {
        "accuracy": float(np.mean(predictions == labels)),
        "loss": float(loss),
        "f1_macro": f1_average("macro"),
        "f1_weighted": f1_average("weighted"),
        "f1_micro": f1_average("micro"),
        "precision_macro": float(np.mean(precision)),
        "recall_macro": float(np.mean(recall)),
        "precision": dict(zip(class_names, map(float, precision))),
        "recall": dict(zip(class_names, map(float, recall))),
        "f1": dict(zip(class_names, map(float, f1))),
        "support": dict(zip(class_names, map(int, support))),
        "confusion_matrix": counts.tolist(),
        "confusion_matrix_normalized": normalized.tolist(),
        "report": classification_report(labels, predictions, **report_args),
        "report_dict": classification_report(labels, predictions, output_dict=True, **report_args),
        "roc_auc": auc,
        "roc_auc_macro": float(np.mean(defined_auc)) if defined_auc else None,
        "ece": expected_calibration_error(labels, probabilities),
        "brier": brier_score(labels, probabilities),
    }


def flat_metrics(metrics: dict, prefix: str = "test_") -> dict[str, float]:
    """The scalars of ``classification_metrics`` plus per-class recall, as MLflow metric keys.

    Keys are ``{prefix}{name}`` and ``{prefix}recall_{class slug}`` ("Early Pre-B" ->
    ``early_pre_b``); an undefined ``roc_auc_macro`` is left out rather than logged as NaN.
    """
    if not _METRIC_KEY.match(prefix):
        raise ValueError(f"prefix must contain only [A-Za-z0-9_], got {prefix!r}")
    names = ("accuracy", "loss", "f1_macro", "f1_weighted", "f1_micro", "precision_macro")
    names += ("recall_macro", "roc_auc_macro", "ece", "brier")
    flat = {f"{prefix}{k}": float(metrics[k]) for k in names if metrics[k] is not None}
    for class_name, value in metrics["recall"].items():
        flat[f"{prefix}recall_{slug(class_name)}"] = float(value)
    return flat


# ---------------------------------------------------------------------------------------------
# Statistics


def _macro_f1_rows(
    labels: np.ndarray, predictions: np.ndarray, n_classes: int, present_only: bool = False
) -> np.ndarray:
    """Macro F1 of each row of (R, n) label/prediction matrices, F1_k = 2 TP / (2 TP + FP + FN).

    Same as sklearn's ``f1_score(average="macro", labels=range(C), zero_division=0)``: a class
    with no true and no predicted items scores 0. With ``present_only`` the mean is over the
    classes the row's labels hold (sklearn's ``labels=np.unique(y_true)``), as a bootstrap
    resample of groups needs: one that drew no block of a class is a test set without that
    class, and scoring the class 0 (or 0 for the few images wrongly called it, whose error
    already counts in their own class's recall) would pull the interval down by a quarter of
    the classes for what the resample lacks, not for what the models did.
    """
    rows = np.arange(labels.shape[0])[:, None] * n_classes
    size = labels.shape[0] * n_classes
    true_counts = np.bincount((rows + labels).ravel(), minlength=size)
    predicted_counts = np.bincount((rows + predictions).ravel(), minlength=size)
    hits = (rows + labels)[labels == predictions]
    true_positives = np.bincount(hits, minlength=size)
    denominator = (true_counts + predicted_counts).reshape(-1, n_classes)
    f1 = np.divide(
        2 * true_positives.reshape(-1, n_classes),
        denominator,
        out=np.zeros(denominator.shape),
        where=denominator > 0,
    )
    if present_only:
        present = true_counts.reshape(-1, n_classes) > 0
        return (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return f1.mean(axis=1)


def _group_members(groups, n: int) -> list[np.ndarray]:
    """The item indices of each group (``groups``: one id per item, any hashable values)."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n:
        raise ValueError(f"groups must give one group per item ({n}), got shape {groups.shape}")
    _, inverse = np.unique(groups.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


def _resampled_statistics(
    n: int, statistic, n_resamples: int, seed: int, groups=None
) -> np.ndarray:
    """``statistic(index)`` over (R, n) blocks of bootstrap indices; shape (n_resamples,).

    With ``groups`` (one id per item) the groups are resampled instead of the items (the
    cluster bootstrap): each resample draws as many groups as there are, with replacement, and
    takes every item of each, so items that were held out together (an index block, duplicates)
    vary together. ``statistic`` then gets one (1, m) index per resample, m varying."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        members = _group_members(groups, n)
        values = np.empty(n_resamples)
        for r in range(n_resamples):
            drawn = rng.integers(0, len(members), size=len(members))
            values[r] = statistic(np.concatenate([members[k] for k in drawn])[None])[0]
        return values
    block = max(1, _BOOTSTRAP_BLOCK // n)
    values = []
    for start in range(0, n_resamples, block):
        index = rng.integers(0, n, size=(min(block, n_resamples - start), n))
        values.append(statistic(index))
    return np.concatenate(values)


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_ci(
    labels,
    predictions,
    metric: str = "accuracy",
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    n_classes: int = len(CLASSES),
    groups=None,
) -> dict:
    """Percentile bootstrap interval for accuracy or macro F1, resampling test images (or,
    with ``groups``, the groups they were held out in).

    Returns ``{"estimate", "low", "high"}``; the estimate is the metric on the full test set.
    ``pooled_bootstrap_ci`` with one model's predictions.
    """
    predictions = _labels(predictions, n_classes, name="predictions")
    return pooled_bootstrap_ci(
        labels, predictions[None], metric, n_resamples, seed, confidence, n_classes, groups
    )


def _correct(values, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D boolean array, got shape {values.shape}")
    if values.dtype != bool and not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} must be boolean (or 0/1), got dtype {values.dtype}")
    return values.astype(bool)


def mcnemar_exact(correct_a, correct_b) -> dict:
    """Exact McNemar test of two classifiers on the same test images.

    Only discordant pairs carry information: under H0 (equal accuracy) ``only_a`` is
    Binomial(only_a + only_b, 0.5); the p-value is the two-sided binomial test, 1.0 when there
    are no discordant pairs.
    """
    correct_a, correct_b = _correct(correct_a, "correct_a"), _correct(correct_b, "correct_b")
    _same_length(correct_a=correct_a, correct_b=correct_b)
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    discordant = only_a + only_b
    p_value = binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0
    return {
        "n": len(correct_a),
        "both_correct": int(np.sum(correct_a & correct_b)),
        "only_a": only_a,
        "only_b": only_b,
        "both_wrong": int(np.sum(~correct_a & ~correct_b)),
        "p_value": float(p_value),
    }


def paired_bootstrap_difference(
    labels,
    predictions_a,
    predictions_b,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    n_classes: int = len(CLASSES),
    groups=None,
) -> dict:
    """Percentile interval for accuracy(a) - accuracy(b), resampling images jointly (or the
    groups of ``groups``).

    Resampling both classifiers' results for the same images keeps their correlation, so the
    interval is narrower than one built from two independent intervals.
    """
    _check_bootstrap(n_resamples, confidence)
    labels = _labels(labels, n_classes)
    predictions_a = _labels(predictions_a, n_classes, name="predictions_a")
    predictions_b = _labels(predictions_b, n_classes, name="predictions_b")
    _same_length(labels=labels, predictions_a=predictions_a, predictions_b=predictions_b)
    difference = (predictions_a == labels).astype(np.float64) - (predictions_b == labels)
    values = _resampled_statistics(
        len(labels), lambda index: difference[index].mean(axis=1), n_resamples, seed, groups
    )
    low, high = _percentile_interval(values, confidence)
    return {"difference": float(difference.mean()), "low": low, "high": high}


def pooled_bootstrap_difference(
    correct_a,
    correct_b,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    groups=None,
) -> dict:
    """Percentile interval for mean-over-seeds accuracy(a) - accuracy(b) on one test set.

    ``correct_a`` (S_a x N) and ``correct_b`` (S_b x N): whether each seed's model got each of
    the same N test images right (one row for a model without seeds). The per-image difference
    d_i = mean_s a[s, i] - mean_s b[s, i] is resampled over images, so the interval covers the
    test sample's noise for the seeds' average, with the models' correlation kept. With
    ``groups`` the groups are resampled (``_resampled_statistics``).
    """
    _check_bootstrap(n_resamples, confidence)
    rows = [np.atleast_2d(np.asarray(c, dtype=bool)) for c in (correct_a, correct_b)]
    if any(r.ndim != 2 or r.size == 0 for r in rows) or rows[0].shape[1] != rows[1].shape[1]:
        raise ValueError(
            "correct_a and correct_b must be non-empty (seeds x images) arrays over the same "
            f"images, got shapes {rows[0].shape} and {rows[1].shape}"
        )
    difference = rows[0].mean(axis=0) - rows[1].mean(axis=0)
    values = _resampled_statistics(
        len(difference), lambda index: difference[index].mean(axis=1), n_resamples, seed, groups
    )
    low, high = _percentile_interval(values, confidence)
    return {"difference": float(difference.mean()), "low": low, "high": high}


def _worst_accuracy(correct: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(S, K, N) correctness of S models under K conditions, (R, m) image indices -> (R,): per
    resample, the mean over models of each model's lowest accuracy over the conditions."""
    return correct[:, :, index].mean(axis=-1).min(axis=1).mean(axis=0)


def pooled_worst_case_difference(
    correct_a,
    correct_b,
    groups=None,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Percentile interval for the mean-over-seeds worst-case accuracy of a minus b.

    ``correct_a`` (S_a x K x N) and ``correct_b`` (S_b x K x N): whether each seed's model got
    each of the same N test images right under each of K conditions (perturbations). A model's
    worst-case ("robust") accuracy is min over k of its accuracy under condition k; the
    statistic is mean_s worst(a_s) - mean_s worst(b_s). Each resample draws the images (with
    ``groups``, the groups) once for every model and condition, so the pairing is kept, and the
    minimum is taken again on the resample (the worst condition may change). Returns
    ``{"difference", "low", "high", "a", "b"}`` (``a``, ``b``: the two full-sample values).
    """
    _check_bootstrap(n_resamples, confidence)
    arrays = [np.asarray(c, dtype=bool) for c in (correct_a, correct_b)]
    if (
        any(a.ndim != 3 or a.size == 0 for a in arrays)
        or arrays[0].shape[1:] != arrays[1].shape[1:]
    ):
        raise ValueError(
            "correct_a and correct_b must be non-empty (seeds x conditions x images) arrays "
            f"over the same conditions and images, got shapes {arrays[0].shape} and "
            f"{arrays[1].shape}"
        )
    a, b = arrays
    n = a.shape[2]
    full = np.arange(n)[None]
    values = _resampled_statistics(
        n,
        lambda index: _worst_accuracy(a, index) - _worst_accuracy(b, index),
        n_resamples,
        seed,
        groups,
    )
    low, high = _percentile_interval(values, confidence)
    worst_a, worst_b = float(_worst_accuracy(a, full)[0]), float(_worst_accuracy(b, full)[0])
    return {"difference": worst_a - worst_b, "low": low, "high": high, "a": worst_a, "b": worst_b}


def pooled_bootstrap_ci(
    labels,
    predictions,
    metric: str = "accuracy",
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    n_classes: int = len(CLASSES),
    groups=None,
) -> dict:
    """Percentile bootstrap interval for the mean over seeds of accuracy or macro F1 (with
    ``groups``, resampling the groups the test images were held out in):
    ``predictions`` is (S x N), one row per seed's model on the same N test images; each
    resample of images scores every seed's model on it and averages. Returns ``{"estimate",
    "low", "high"}``; the estimate is the mean of the models' metrics on the full test set."""
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"unsupported metric {metric!r}; choose one of {BOOTSTRAP_METRICS}")
    _check_bootstrap(n_resamples, confidence)
    labels = _labels(labels, n_classes)
    rows = np.atleast_2d(np.asarray(predictions))
    rows = np.stack([_labels(row, n_classes, name="predictions") for row in rows])
    _same_length(labels=labels, predictions=rows[0])

    def statistic(index: np.ndarray, resample: bool = True) -> np.ndarray:
        if metric == "accuracy":
            return np.mean([(row[index] == labels[index]).mean(axis=1) for row in rows], axis=0)
        f1 = [_macro_f1_rows(labels[index], row[index], n_classes, resample) for row in rows]
        return np.mean(f1, axis=0)

    # The estimate is the metric each run logged (every class counts); a resample's macro F1
    # is over the classes it holds images of.
    estimate = statistic(np.arange(len(labels))[None], resample=False)[0]
    values = _resampled_statistics(len(labels), statistic, n_resamples, seed, groups)
    low, high = _percentile_interval(values, confidence)
    return {"estimate": float(estimate), "low": low, "high": high}
