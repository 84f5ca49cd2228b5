"""Reports, statistics and figures on hand-made arrays with known answers."""

from __future__ import annotations

import math
import re
import time
import warnings

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import f1_score, roc_auc_score

from leukemia import figures, metrics
from leukemia.data import CLASSES

ABC = ("a", "b", "c")
# Six items, three classes. Per class (TP, predicted, true) and P, R, F1 = 2TP / (pred + true):
#   a: TP 1, pred 2 (items 0, 5), true 2 -> P 1/2, R 1/2, F1 1/2
#   b: TP 2, pred 3 (items 1-3),  true 2 -> P 2/3, R 1,   F1 4/5
#   c: TP 1, pred 1 (item 4),     true 2 -> P 1,   R 1/2, F1 2/3
# accuracy 4/6; macro F1 (1/2 + 4/5 + 2/3) / 3 = 59/90; macro P 13/18; macro R 2/3.
HAND_LABELS = np.array([0, 0, 1, 1, 2, 2])
HAND_PREDICTIONS = np.array([0, 1, 1, 1, 2, 0])


def confident(predictions, n_classes: int, top: float = 0.8) -> np.ndarray:
    """Probabilities with ``top`` on the predicted class and the rest shared equally."""
    rest = (1 - top) / (n_classes - 1)
    probabilities = np.full((len(predictions), n_classes), rest)
    probabilities[np.arange(len(predictions)), predictions] = top
    return probabilities


def noisy_predictions(labels, accuracy: float, n_classes: int, seed: int = 0) -> np.ndarray:
    """Exactly round(accuracy * n) correct predictions, the rest shifted to another class."""
    rng = np.random.default_rng(seed)
    wrong = rng.permutation(len(labels))[: round((1 - accuracy) * len(labels))]
    predictions = labels.copy()
    predictions[wrong] = (labels[wrong] + 1) % n_classes
    return predictions


def test_perfect_confident_predictions():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    result = metrics.classification_metrics(labels, np.eye(4)[labels])
    assert result["accuracy"] == 1.0
    assert result["f1_macro"] == result["f1_weighted"] == result["f1_micro"] == 1.0
    assert result["ece"] == pytest.approx(0.0, abs=1e-12)
    assert result["loss"] == pytest.approx(0.0, abs=1e-12)
    assert result["roc_auc_macro"] == 1.0
    assert result["confusion_matrix"] == (2 * np.eye(4, dtype=int)).tolist()
    assert result["support"] == dict.fromkeys(CLASSES, 2)


def test_hand_computed_example():
    probabilities = confident(HAND_PREDICTIONS, 3)
    result = metrics.classification_metrics(HAND_LABELS, probabilities, class_names=ABC)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["f1_macro"] == pytest.approx(59 / 90)
    assert result["precision_macro"] == pytest.approx(13 / 18)
    assert result["recall_macro"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx({"a": 1 / 2, "b": 4 / 5, "c": 2 / 3})
    assert result["f1_micro"] == pytest.approx(result["accuracy"])
    # Weighted by support 2, 2, 2 it equals the macro mean.
    assert result["f1_weighted"] == pytest.approx(59 / 90)
    assert result["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # Four items hold 0.8 on the true class, two hold 0.1 on it.
    assert result["loss"] == pytest.approx(-(4 * math.log(0.8) + 2 * math.log(0.1)) / 6)
    # Every confidence is 0.8, one bin: |accuracy - confidence| = |4/6 - 0.8|.
    assert result["ece"] == pytest.approx(0.8 - 4 / 6)
    # Class a scores: positives {0.8, 0.1}, negatives {0.1, 0.1, 0.1, 0.8}: (3 + 1/2 + 3/2) / 8.
    assert result["roc_auc"]["a"] == pytest.approx(5 / 8)
    for k, name in enumerate(ABC):
        expected = roc_auc_score(HAND_LABELS == k, probabilities[:, k])
        assert result["roc_auc"][name] == pytest.approx(expected)
    assert "macro avg" in result["report"] and "0.6556" in result["report"]
    assert result["report_dict"]["b"]["f1-score"] == pytest.approx(0.8)


def test_given_loss_is_kept():
    result = metrics.classification_metrics(HAND_LABELS, confident(HAND_PREDICTIONS, 3), ABC, 0.5)
    assert result["loss"] == 0.5


def test_absent_class_gets_a_zero_row_without_nan_or_warnings():
    labels = np.array([0, 0, 1, 2, 2, 1])  # Pro-B (3) never occurs
    predictions = np.array([0, 3, 1, 2, 2, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metrics.classification_metrics(labels, confident(predictions, 4))
    assert result["confusion_matrix"][3] == [0, 0, 0, 0]
    normalized = np.array(result["confusion_matrix_normalized"])
    assert not np.isnan(normalized).any()
    assert normalized[3].tolist() == [0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(normalized[:3].sum(axis=1), 1.0)
    assert result["roc_auc"]["Pro-B"] is None
    assert result["roc_auc_macro"] == pytest.approx(
        np.mean([result["roc_auc"][c] for c in CLASSES[:3]])
    )
    assert result["support"]["Pro-B"] == 0
    assert "Pro-B" in result["report"]


def test_single_class_labels_leave_auc_undefined():
    labels = np.zeros(5, dtype=int)
    result = metrics.classification_metrics(labels, confident(labels, 4))
    assert all(v is None for v in result["roc_auc"].values())
    assert result["roc_auc_macro"] is None
    assert "test_roc_auc_macro" not in metrics.flat_metrics(result)


def test_flat_metrics_keys_are_mlflow_safe():
    labels = np.array([0, 1, 2, 3, 1])
    flat = metrics.flat_metrics(metrics.classification_metrics(labels, confident(labels, 4)))
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", key) for key in flat)
    assert {"test_accuracy", "test_ece", "test_roc_auc_macro", "test_recall_early_pre_b"} <= set(
        flat
    )
    assert {"test_recall_benign", "test_recall_pre_b", "test_recall_pro_b"} <= set(flat)
    assert all(isinstance(v, float) for v in flat.values())
    assert "val_f1_macro" in metrics.flat_metrics(
        metrics.classification_metrics(labels, confident(labels, 4)), prefix="val_"
    )
    with pytest.raises(ValueError, match="prefix"):
        metrics.flat_metrics({}, prefix="test/")


def test_tensor_and_list_inputs_are_accepted():
    torch = pytest.importorskip("torch")
    probabilities = confident(HAND_PREDICTIONS, 3)
    from_tensor = metrics.classification_metrics(
        torch.tensor(HAND_LABELS), torch.tensor(probabilities, dtype=torch.float32), ABC
    )
    from_list = metrics.classification_metrics(
        HAND_LABELS.tolist(), probabilities.tolist(), class_names=ABC
    )
    assert from_tensor["f1_macro"] == pytest.approx(from_list["f1_macro"]) == 59 / 90


@pytest.mark.parametrize(
    ("labels", "probabilities", "message"),
    [
        ([0, 1], np.full((2, 3), 0.25), r"shape \(n, C\) = \(2, 4\)"),
        ([0, 4], np.full((2, 4), 0.25), r"\[0, 4\)"),
        ([0, -1], np.full((2, 4), 0.25), r"\[0, 4\)"),
        ([0.0, 1.0], np.full((2, 4), 0.25), "integer"),
        ([[0, 1]], np.full((2, 4), 0.25), "1-D"),
        ([], np.zeros((0, 4)), "non-empty"),
        ([0, 1, 2], np.full((2, 4), 0.25), r"\(3, 4\)"),
        ([0, 1], [[0.5, np.nan, 0, 0], [1, 0, 0, 0]], "finite"),
    ],
)
def test_bad_inputs_raise(labels, probabilities, message):
    with pytest.raises(ValueError, match=message):
        metrics.classification_metrics(labels, probabilities)


def test_mcnemar_hand_example():
    # 8 images only A gets right, 1 only B: p = 2 P(X <= 1 | n=9, p=1/2) = 2 * 10 / 512.
    correct_a = np.array([True] * 8 + [False] + [True] * 5 + [False] * 2)
    correct_b = np.array([False] * 8 + [True] + [True] * 5 + [False] * 2)
    result = metrics.mcnemar_exact(correct_a, correct_b)
    assert result == {
        "n": 16,
        "both_correct": 5,
        "only_a": 8,
        "only_b": 1,
        "both_wrong": 2,
        "p_value": pytest.approx(0.0390625),
    }


def test_mcnemar_identical_predictions_and_bad_input():
    correct = np.array([True, False, True])
    assert metrics.mcnemar_exact(correct, correct)["p_value"] == 1.0
    assert metrics.mcnemar_exact([1, 0, 1], [1, 0, 0])["only_a"] == 1
    with pytest.raises(ValueError, match="equal lengths"):
        metrics.mcnemar_exact(correct, correct[:2])
    with pytest.raises(ValueError, match="boolean"):
        metrics.mcnemar_exact([0, 2, 1], [0, 1, 1])


def test_macro_f1_fast_path_matches_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(20, 30))
    predictions = np.where(rng.random((20, 30)) < 0.6, labels, rng.integers(0, 4, size=(20, 30)))
    labels[0] = 0  # a row where classes 1-3 are absent from the labels
    fast = metrics._macro_f1_rows(labels, predictions, 4)
    for row in range(20):
        expected = f1_score(
            labels[row], predictions[row], labels=range(4), average="macro", zero_division=0
        )
        assert fast[row] == pytest.approx(expected)
    present = metrics._macro_f1_rows(labels, predictions, 4, present_only=True)
    for row in range(20):
        held = np.unique(labels[row])
        expected = f1_score(labels[row], predictions[row], labels=held, average="macro")
        assert present[row] == pytest.approx(expected)


def test_group_bootstrap_of_macro_f1_does_not_score_classes_a_resample_lacks():
    """Blocks hold one class each, so a resample of blocks often misses a class; a perfect model
    still scores macro F1 1 on every resample (scoring the missing class 0 gave 0.75 or less),
    and a model that calls some images of a class another does not score 0 for that other class
    in a resample without it (its error counts in the true class's recall)."""
    labels = np.repeat(np.arange(4), 30)
    groups = np.repeat(np.arange(12), 10)  # 3 one-class blocks per class
    perfect = metrics.bootstrap_ci(labels, labels, "f1_macro", n_resamples=500, groups=groups)
    assert perfect == {"estimate": 1.0, "low": 1.0, "high": 1.0}
    predictions = labels.copy()
    predictions[:5] = 1  # half of one class-0 block called class 1
    interval = metrics.bootstrap_ci(
        labels, predictions, "f1_macro", n_resamples=2000, groups=groups
    )
    expected = f1_score(labels, predictions, average="macro")
    assert interval["estimate"] == pytest.approx(expected)
    assert interval["low"] < interval["estimate"] < interval["high"] == 1.0
    # Class 1 absent from a resample: only class 0's recall suffers (5 of 10 in one block).
    without_class_1 = metrics._macro_f1_rows(
        labels[None, labels != 1], predictions[None, labels != 1], 4, present_only=True
    )[0]
    assert without_class_1 == pytest.approx((2 * 25 / (30 + 25) + 1 + 1) / 3)


@pytest.mark.parametrize("metric", metrics.BOOTSTRAP_METRICS)
def test_bootstrap_ci_contains_estimate_and_narrows(metric):
    widths = []
    for n in (40, 800):
        labels = np.arange(n) % 4
        predictions = noisy_predictions(labels, 0.8, 4)
        ci = metrics.bootstrap_ci(labels, predictions, metric=metric, n_resamples=500)
        assert ci["low"] <= ci["estimate"] <= ci["high"]
        widths.append(ci["high"] - ci["low"])
    assert ci["estimate"] == pytest.approx(
        0.8 if metric == "accuracy" else f1_score(labels, predictions, average="macro")
    )
    assert widths[1] < widths[0] / 2  # width shrinks like 1 / sqrt(n): 20x the items


def test_bootstrap_ci_is_reproducible_fast_and_validated():
    labels = np.arange(400) % 4
    predictions = noisy_predictions(labels, 0.7, 4)
    start = time.perf_counter()
    first = metrics.bootstrap_ci(labels, predictions, metric="f1_macro", n_resamples=1000, seed=3)
    assert time.perf_counter() - start < 2.0
    assert first == metrics.bootstrap_ci(
        labels, predictions, metric="f1_macro", n_resamples=1000, seed=3
    )
    with pytest.raises(ValueError, match="unsupported metric"):
        metrics.bootstrap_ci(labels, predictions, metric="auc")
    with pytest.raises(ValueError, match="equal lengths"):
        metrics.bootstrap_ci(labels, predictions[:-1])
    with pytest.raises(ValueError, match="confidence"):
        metrics.bootstrap_ci(labels, predictions, confidence=95)


def test_paired_bootstrap_difference_sign():
    labels = np.arange(400) % 4
    good = noisy_predictions(labels, 0.9, 4, seed=1)
    poor = noisy_predictions(labels, 0.6, 4, seed=2)
    better = metrics.paired_bootstrap_difference(labels, good, poor)
    assert better["difference"] == pytest.approx(0.3)
    assert 0 < better["low"] <= better["difference"] <= better["high"]
    worse = metrics.paired_bootstrap_difference(labels, poor, good)
    assert worse["difference"] == pytest.approx(-0.3) and worse["high"] < 0
    same = metrics.paired_bootstrap_difference(labels, good, good)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError, match="equal lengths"):
        metrics.paired_bootstrap_difference(labels, good, poor[:-1])


def history(epochs: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "phase": "head" if e < 3 else "finetune",
            "train_loss": 1 / (e + 1),
            "train_accuracy": 1 - 1 / (e + 2),
            "val_loss": 1.2 / (e + 1),
            "val_accuracy": 1 - 1.2 / (e + 2),
        }
        for e in range(epochs)
    ]


def test_figures_build_and_save(tmp_path):
    labels = np.arange(40) % 4
    probabilities = confident(noisy_predictions(labels, 0.75, 4), 4, top=0.7)
    result = metrics.classification_metrics(labels, probabilities)
    built = {
        "curves": (figures.curves_figure(history(6), phase2_start_epoch=3), 2),
        "curves_one_phase": (figures.curves_figure(history(2), None), 2),
        "confusion": (
            figures.confusion_figure(
                result["confusion_matrix"], normalized=result["confusion_matrix_normalized"]
            ),
            1,
        ),
        "confusion_counts": (figures.confusion_figure(result["confusion_matrix"]), 1),
        "reliability": (figures.reliability_figure(labels, probabilities), 1),
        "comparison": (
            figures.comparison_figure({"paper": [0.9, 0.92, 0.91], "ours": [0.95]}, "accuracy"),
            1,
        ),
    }
    for name, (figure, n_axes) in built.items():
        assert isinstance(figure, Figure)
        assert len(figure.axes) == n_axes, name
        figure.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    curves = built["curves"][0]
    assert all("fine-tuning starts" in ax.get_legend_handles_labels()[1] for ax in curves.axes)
    ece = f"{result['ece']:.4f}"
    assert ece in built["reliability"][0].axes[0].get_title()


def test_figure_inputs_are_validated():
    with pytest.raises(ValueError, match="missing"):
        figures.curves_figure([{"epoch": 0}], None)
    with pytest.raises(ValueError, match="shape"):
        figures.confusion_figure([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="non-empty"):
        figures.comparison_figure({"arm": []}, "accuracy")


def test_pooled_bootstrap_difference_known_answers():
    a = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)  # accuracies 0.5, 0.75
    b = np.array([[1, 0, 0, 0]], dtype=bool)  # a model without seeds: 0.25
    result = metrics.pooled_bootstrap_difference(a, b, n_resamples=200)
    assert result["difference"] == pytest.approx((0.5 + 0.75) / 2 - 0.25)
    assert result["low"] <= result["difference"] <= result["high"]
    same = metrics.pooled_bootstrap_difference(a, a, n_resamples=50)
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    # One seed: exactly the per-seed paired interval (same images resampled, same seed).
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 60)
    pred_a, pred_b = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
    single = metrics.paired_bootstrap_difference(labels, pred_a, pred_b, n_resamples=300, seed=5)
    pooled = metrics.pooled_bootstrap_difference(
        pred_a == labels, pred_b == labels, n_resamples=300, seed=5
    )
    assert pooled == pytest.approx(single)
    # Repeating a seed's row changes nothing: the pool averages per image.
    twice = metrics.pooled_bootstrap_difference(
        np.stack([pred_a == labels] * 2), pred_b == labels, n_resamples=300, seed=5
    )
    assert twice == pytest.approx(single)
    with pytest.raises(ValueError, match="over the same images"):
        metrics.pooled_bootstrap_difference(a, np.ones((1, 5), dtype=bool))


@pytest.mark.parametrize("metric", ["accuracy", "f1_macro"])
def test_pooled_bootstrap_ci_known_answers(metric):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, 80)
    rows = np.stack([np.where(rng.random(80) < p, labels, (labels + 1) % 4) for p in (0.6, 0.9)])
    pooled = metrics.pooled_bootstrap_ci(labels, rows, metric, n_resamples=300, seed=2)
    each = [metrics.bootstrap_ci(labels, r, metric, n_resamples=300, seed=2) for r in rows]
    # The estimate is the mean of the seeds' own values ...
    assert pooled["estimate"] == pytest.approx(np.mean([e["estimate"] for e in each]))
    # ... one seed is exactly bootstrap_ci, and the pooled interval lies between the seeds'.
    one = metrics.pooled_bootstrap_ci(labels, rows[:1], metric, n_resamples=300, seed=2)
    assert one == pytest.approx(each[0])
    assert each[0]["low"] < pooled["low"] < each[1]["low"]
    assert each[0]["high"] < pooled["high"] < each[1]["high"]
    if metric == "accuracy":
        expected = np.mean([(r == labels).mean() for r in rows])
        assert pooled["estimate"] == pytest.approx(expected)
    else:
        expected = np.mean([f1_score(labels, r, average="macro") for r in rows])
        assert pooled["estimate"] == pytest.approx(expected)


def test_difference_figure():
    pooled = {
        "proposed_vs_baseline": {"difference": -0.02, "low": -0.05, "high": 0.01},
        "baseline_vs_shortcut-rgb": {"difference": -0.04, "low": -0.07, "high": -0.01},
    }
    fig = figures.difference_figure(pooled)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["proposed − baseline", "baseline − shortcut-rgb"]
    with pytest.raises(ValueError, match="at least one pair"):
        figures.difference_figure({})


def test_resampling_groups_widens_the_interval_when_a_group_moves_together():
    """Two held-out blocks of 50 images, one all right and one all wrong: resampling images
    gives about 0.5 +- 0.1, resampling the two blocks gives 0, 0.5 or 1 (probabilities 1/4,
    1/2, 1/4), so its 95% interval is [0, 1]."""
    labels = np.zeros(100, dtype=int)
    predictions = np.r_[np.zeros(50, dtype=int), np.ones(50, dtype=int)]
    groups = ["a"] * 50 + ["b"] * 50
    images = metrics.bootstrap_ci(labels, predictions, n_resamples=2000)
    blocks = metrics.bootstrap_ci(labels, predictions, n_resamples=2000, groups=groups)
    assert images["estimate"] == blocks["estimate"] == 0.5
    assert 0.35 < images["low"] < 0.45 and 0.55 < images["high"] < 0.65
    assert (blocks["low"], blocks["high"]) == (0.0, 1.0)
    correct_a = (predictions == labels)[None]
    pooled = metrics.pooled_bootstrap_difference(
        correct_a, np.ones((1, 100), bool), n_resamples=2000, groups=groups
    )
    assert pooled["difference"] == -0.5 and (pooled["low"], pooled["high"]) == (-1.0, 0.0)
    paired = metrics.paired_bootstrap_difference(
        labels, predictions, labels, n_resamples=2000, groups=groups
    )
    assert (paired["low"], paired["high"]) == (-1.0, 0.0)


def test_singleton_groups_give_the_image_bootstrap_distribution():
    """One group per image is the image bootstrap: the same interval up to resampling noise
    (checked against an independent loop over numpy's choice)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 400)
    predictions = np.where(rng.random(400) < 0.8, labels, (labels + 1) % 4)
    grouped = metrics.bootstrap_ci(
        labels, predictions, n_resamples=3000, groups=np.arange(400), seed=1
    )
    correct = predictions == labels
    reference = [correct[rng.choice(400, 400)].mean() for _ in range(3000)]
    low, high = np.quantile(reference, [0.025, 0.975])
    assert abs(grouped["low"] - low) < 0.01 and abs(grouped["high"] - high) < 0.01


def test_groups_must_match_the_items():
    with pytest.raises(ValueError, match=r"one group per item \(3\)"):
        metrics.bootstrap_ci([0, 1, 2], [0, 1, 2], groups=["a", "b"])


def test_brier_score_matches_scikit_learn_one_vs_rest():
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(4), 50)
    labels = rng.integers(0, 4, 50)
    per_class = sum(brier_score_loss(labels == k, probabilities[:, k]) for k in range(4))
    assert metrics.brier_score(labels, probabilities) == pytest.approx(per_class)
    assert metrics.brier_score([0, 1], [[1, 0, 0, 0], [0, 1, 0, 0]]) == 0.0
    assert metrics.brier_score([0], [[0, 1, 0, 0]]) == 2.0


def test_temperature_scaling_recovers_the_temperature_that_made_overconfident_logits():
    """Labels drawn from softmax(z); a model reporting softmax(3 z) is overconfident by 3:
    the fitted T is about 3, the predicted classes do not change, ECE and NLL drop."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (4000, 4))
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in true])
    reported = metrics.temperature_scaled(true, 1 / 3)  # softmax(3 z)
    temperature = metrics.fit_temperature(labels, reported)
    assert temperature == pytest.approx(3.0, rel=0.08)
    calibrated = metrics.temperature_scaled(reported, temperature)
    assert (calibrated.argmax(1) == reported.argmax(1)).all()
    np.testing.assert_allclose(calibrated, true, atol=0.05)
    summary = metrics.calibration_summary(labels, reported, temperature)
    assert summary["ece_calibrated"] < summary["ece_uncalibrated"] / 2
    assert summary["brier_calibrated"] < summary["brier_uncalibrated"]
    # T = 1 changes nothing; 1/T undoes T.
    np.testing.assert_allclose(metrics.temperature_scaled(true, 1.0), true, atol=1e-12)
    np.testing.assert_allclose(
        metrics.temperature_scaled(metrics.temperature_scaled(true, 2.0), 0.5), true, atol=1e-9
    )


def test_pooled_worst_case_difference_known_answers():
    from leukemia.metrics import pooled_worst_case_difference

    # One seed each, 2 conditions x 4 images. a: condition 1 gets half right -> worst 0.5;
    # b: condition 0 gets a quarter right -> worst 0.25.
    a = np.array([[[1, 1, 1, 1], [1, 1, 0, 0]]], bool)
    b = np.array([[[1, 0, 0, 0], [1, 1, 1, 1]]], bool)
    one_group = pooled_worst_case_difference(a, b, n_resamples=50, groups=["g"] * 4)
    assert one_group == {"difference": 0.25, "low": 0.25, "high": 0.25, "a": 0.5, "b": 0.25}

    # Against a plain-loop reference on the same bootstrap draws (one block of indices).
    rng = np.random.default_rng(3)
    a = rng.random((3, 4, 40)) < 0.8
    b = rng.random((2, 4, 40)) < 0.7
    got = pooled_worst_case_difference(a, b, n_resamples=200, seed=5)
    index = np.random.default_rng(5).integers(0, 40, size=(200, 40))

    def worst(correct, rows):
        return np.mean(
            [min(correct[s, k, rows].mean() for k in range(4)) for s in range(len(correct))]
        )

    values = [worst(a, rows) - worst(b, rows) for rows in index]
    low, high = np.quantile(values, [0.025, 0.975])
    assert got["low"] == pytest.approx(low) and got["high"] == pytest.approx(high)
    assert got["difference"] == pytest.approx(worst(a, np.arange(40)) - worst(b, np.arange(40)))
    with pytest.raises(ValueError, match="seeds x conditions x images"):
        pooled_worst_case_difference(a, b[:, :3])
