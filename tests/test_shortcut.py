"""The shortcut arm: colour and brightness features, the C search, its errors and warnings."""

from __future__ import annotations

import csv
import shutil
import warnings

import cv2
import numpy as np
import pytest

from leukemia import images, shortcut
from leukemia.data import CLASSES, DatasetError
from leukemia.shortcut import (
    KINDS,
    ShortcutWarning,
    feature_names,
    features,
    fit_shortcut,
    load_split_features,
)


def _reference(plane: np.ndarray, bins: int) -> np.ndarray:
    """NumPy histogram, mean and population sd of one uint8 plane, scaled as ``features``."""
    hist, _ = np.histogram(plane, bins=bins, range=(0, 256))
    return hist / plane.size, plane.mean() / 255, plane.std() / 255


def _copy(processed, tmp_path, keep=lambda row: True, pixels=None):
    """A writable copy of a processed folder: manifest rows filtered, PNGs optionally redrawn."""
    target = tmp_path / "processed"
    shutil.copytree(processed, target)
    manifest = target / "manifest.csv"
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fieldnames, rows = reader.fieldnames, [row for row in reader if keep(row)]
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    if pixels is not None:
        for row in rows:
            png = target / row["processed"]
            png.write_bytes(images.encode_png(pixels(images.read_png(png))))
    return target


def test_feature_names_match_the_vectors():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    for kind, width in [("rgb", 54), ("gray", 34), ("background", 55)]:
        names = feature_names(kind)
        assert len(names) == len(set(names)) == width
        vector = features(image, kind)
        assert vector.dtype == np.float64 and vector.shape == (width,)
    assert feature_names("rgb")[:2] == ["r_hist_00", "r_hist_01"]
    assert feature_names("rgb")[16] == "g_hist_00" and feature_names("rgb")[47] == "b_hist_15"
    assert feature_names("rgb")[48:] == ["r_mean", "g_mean", "b_mean", "r_sd", "g_sd", "b_sd"]
    assert feature_names("gray")[31:] == ["gray_hist_31", "gray_mean", "gray_sd"]
    assert KINDS == ("rgb", "gray", "background")
    assert feature_names("background")[0] == "bg_r_hist_00"
    assert feature_names("background")[-1] == "bg_fraction"


def test_background_features_are_the_rgb_statistics_outside_the_closed_mask():
    """A dark 12 x 12 cell (R 20) on a pale background (R 200, B 230), 32 x 32: the background
    is what lies outside the closed Otsu mask, here everything but the cell."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, :] = (200, 180, 230)
    image[10:22, 10:22] = (20, 10, 60)
    vector = dict(zip(feature_names("background"), features(image, "background")))
    assert vector["bg_fraction"] == pytest.approx(1 - 144 / 1024)
    assert vector["bg_r_hist_12"] == 1 and vector["bg_b_hist_14"] == 1  # 200 // 16, 230 // 16
    assert vector["bg_r_mean"] == pytest.approx(200 / 255) and vector["bg_r_sd"] == 0
    # Against numpy, with the mask computed independently (threshold, then closing by cv2).
    rng = np.random.default_rng(2)
    noisy = np.clip(image.astype(int) + rng.integers(-15, 16, image.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    gray = cv2.cvtColor(noisy, cv2.COLOR_RGB2GRAY)
    t, _ = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    cells = (gray <= t).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    background = cv2.morphologyEx(cells, cv2.MORPH_CLOSE, kernel) == 0
    pixels = noisy[background]
    expected = np.concatenate(
        [np.histogram(pixels[:, c], bins=16, range=(0, 256))[0] / len(pixels) for c in range(3)]
        + [pixels.mean(0) / 255, pixels.std(0) / 255, [background.mean()]]
    )
    np.testing.assert_allclose(features(noisy, "background"), expected, atol=1e-9)
    # No background at all: zeros, not a division by zero.
    assert not features(np.zeros((8, 8, 3), np.uint8), "background").any()


def test_rgb_features_of_flat_channels():
    image = np.zeros((5, 5, 3), dtype=np.uint8)
    image[:, :, 0] = 200  # bin 200 // 16 = 12
    image[:, :, 2] = 255  # the last bin
    vector = dict(zip(feature_names("rgb"), features(image, "rgb")))
    assert vector["r_hist_12"] == 1 and vector["g_hist_00"] == 1 and vector["b_hist_15"] == 1
    assert sum(vector[f"r_hist_{b:02d}"] for b in range(16)) == 1
    assert sum(v for v in vector.values()) == pytest.approx(3 + 200 / 255 + 1)
    assert vector["r_mean"] == pytest.approx(200 / 255)
    assert vector["g_mean"] == 0 and vector["b_mean"] == pytest.approx(1)
    assert vector["r_sd"] == vector["g_sd"] == vector["b_sd"] == 0


def test_rgb_features_match_numpy():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    image[0, 0] = (15, 16, 255)  # both sides of a bin edge, and the top value
    parts = [_reference(image[:, :, c], 16) for c in range(3)]
    expected = np.concatenate(
        [p[0] for p in parts] + [[p[1] for p in parts], [p[2] for p in parts]]
    )
    np.testing.assert_allclose(features(image, "rgb"), expected, rtol=1e-12, atol=1e-15)
    half = np.zeros((2, 2, 3), dtype=np.uint8)
    half[0] = 255
    vector = dict(zip(feature_names("rgb"), features(half, "rgb")))
    assert vector["r_mean"] == pytest.approx(0.5) and vector["r_sd"] == pytest.approx(0.5)


def test_gray_features_of_identical_channels_are_those_of_the_plane():
    rng = np.random.default_rng(2)
    plane = rng.integers(0, 256, (13, 8), dtype=np.uint8)
    stacked = np.repeat(plane[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(features(stacked, "gray"), features(plane, "gray"))
    hist, mean, sd = _reference(plane, 32)
    np.testing.assert_allclose(features(plane, "gray"), [*hist, mean, sd], rtol=1e-12)
    # A colour image goes through OpenCV's luma; identical channels need no conversion.
    colour = rng.integers(0, 256, (13, 8, 3), dtype=np.uint8)
    hist, mean, sd = _reference(cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY), 32)
    np.testing.assert_allclose(features(colour, "gray"), [*hist, mean, sd], rtol=1e-12)
    np.testing.assert_array_equal(features(plane, "rgb"), features(stacked, "rgb"))


def test_features_reject_bad_input():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"unsupported feature kind, got 'hsv'"):
        features(image, "hsv")
    with pytest.raises(ValueError, match="unsupported feature kind"):
        feature_names("RGB")
    with pytest.raises(ValueError, match="expected a uint8 image array, got float64"):
        features(image.astype(np.float64), "rgb")
    with pytest.raises(ValueError, match=r"got shape \(4, 4, 4\)"):
        features(np.zeros((4, 4, 4), dtype=np.uint8), "gray")


def test_load_split_features_follows_the_manifest(small_processed):
    data = load_split_features(small_processed, "gray")
    with (small_processed / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for split, (X, y, paths) in data.items():
        split_rows = [row for row in rows if row["split"] == split]
        assert X.shape == (len(split_rows), 34) and paths == [row["path"] for row in split_rows]
        np.testing.assert_array_equal(y, [int(row["label"]) for row in split_rows])
    first = next(row for row in rows if row["split"] == "train")
    expected = features(images.read_png(small_processed / first["processed"]), "gray")
    np.testing.assert_array_equal(data["train"][0][0], expected)


@pytest.mark.parametrize("kind", KINDS)
def test_fit_shortcut_on_the_small_set(small_processed, kind):
    Cs = (0.1, 1.0, 10.0)
    with warnings.catch_warnings():
        # The 64-pixel segmented images never reach some bins: that warning is tested below.
        warnings.simplefilter("ignore", ShortcutWarning)
        result = fit_shortcut(small_processed, kind=kind, Cs=Cs, seed=0)
        again = fit_shortcut(small_processed, kind=kind, Cs=Cs, seed=0)
    print(f"fit_shortcut({kind!r}) on small_processed: {result.seconds:.3f} s")
    assert result.seconds < 10
    assert result.kind == kind and result.C in Cs
    assert set(result.val_accuracy_by_C) == set(Cs) == set(result.val_log_loss_by_C)
    accuracy, loss = result.val_accuracy_by_C, result.val_log_loss_by_C
    assert result.C == min(Cs, key=lambda C: (-accuracy[C], loss[C], C))
    n_test = len(result.test_paths)
    assert n_test == 4 and result.test_probabilities.shape == (n_test, len(CLASSES))
    np.testing.assert_allclose(result.test_probabilities.sum(axis=1), 1, rtol=1e-12)
    assert result.test_labels.dtype.kind == "i" and sorted(result.test_labels) == [0, 1, 2, 3]
    names = feature_names(kind)
    assert sorted(result.feature_names + result.dropped_features) == sorted(names)
    # The pipeline takes full feature vectors and reproduces the reported probabilities.
    data = load_split_features(small_processed, kind)
    np.testing.assert_allclose(
        result.pipeline.predict_proba(data["test"][0]), result.test_probabilities
    )
    X_val, y_val, _ = data["val"]
    assert accuracy[result.C] == np.mean(result.pipeline.predict(X_val) == y_val)
    np.testing.assert_array_equal(again.test_probabilities, result.test_probabilities)


def test_no_convergence_is_one_clear_warning(small_processed, monkeypatch):
    monkeypatch.setattr(shortcut, "MAX_ITER", 1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fit_shortcut(small_processed, kind="gray", Cs=(1.0, 100.0))
    messages = [str(w.message) for w in record if not issubclass(w.category, ShortcutWarning)]
    assert messages == [], "sklearn's ConvergenceWarning leaked"
    match = [str(w.message) for w in record if "did not converge" in str(w.message)]
    assert match == [
        "LogisticRegression did not converge in 1 iterations for C in [1.0, 100.0]; "
        "their validation scores may be understated"
    ]
    assert result.pipeline["logreg"].max_iter == 1


def test_fit_shortcut_rejects_bad_arguments(small_processed, tmp_path):
    with pytest.raises(ValueError, match="Cs must be a non-empty sequence of positive"):
        fit_shortcut(small_processed, Cs=(1.0, 0.0))
    with pytest.raises(ValueError, match="Cs must be a non-empty sequence"):
        fit_shortcut(small_processed, Cs=())
    with pytest.raises(ValueError, match="unsupported feature kind"):
        fit_shortcut(small_processed, kind="hsv")
    with pytest.raises(DatasetError, match="run leukemia preprocess first"):
        fit_shortcut(tmp_path / "nowhere")


def test_a_class_without_training_images_is_named(small_processed, tmp_path):
    copy = _copy(
        small_processed, tmp_path, keep=lambda r: r["split"] != "train" or r["label"] != "3"
    )
    with pytest.raises(DatasetError, match=r"class\(es\) \['Pro-B'\] have no training images"):
        fit_shortcut(copy)


def test_an_empty_split_is_named(small_processed, tmp_path):
    copy = _copy(small_processed, tmp_path, keep=lambda row: row["split"] != "val")
    with pytest.raises(DatasetError, match=r"no val images in .*manifest\.csv"):
        fit_shortcut(copy)


def test_an_all_black_set_is_an_error_not_a_solver_crash(small_processed, tmp_path):
    copy = _copy(small_processed, tmp_path, pixels=np.zeros_like)
    for kind in KINDS:
        with pytest.raises(DatasetError, match=f"every {kind} feature is constant"):
            fit_shortcut(copy, kind=kind)


def test_constant_features_are_named_and_dropped(small_processed, tmp_path):
    # Halved intensities never reach the upper half of the range: bins 8..15 stay empty.
    copy = _copy(small_processed, tmp_path, pixels=lambda rgb: rgb // 2)
    with pytest.warns(ShortcutWarning, match=r"constant over the training split") as record:
        result = fit_shortcut(copy, kind="rgb", Cs=(1.0,))
    message = str(next(w.message for w in record if "constant" in str(w.message)))
    assert "r_hist_08" in message and "more" in message, message
    upper = {f"{c}_hist_{b:02d}" for c in "rgb" for b in range(8, 16)}
    assert upper <= set(result.dropped_features)
    assert not upper & set(result.feature_names)
    assert len(result.feature_names) == result.pipeline["scale"].n_features_in_
    np.testing.assert_allclose(result.test_probabilities.sum(axis=1), 1, rtol=1e-12)
