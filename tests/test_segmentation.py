"""The paper's operator against hand-made arrays, an independent NumPy Otsu and scikit-image."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from skimage.filters import threshold_otsu

from leukemia import images, synthetic
from leukemia import segmentation as seg
from leukemia.segmentation import SegmentationParams

from .conftest import REAL_DATA, requires_real_data


def numpy_otsu(values: np.ndarray) -> int:
    """t* = argmax_t w0 (mu0 - mu_T)^2 + w1 (mu1 - mu_T)^2, class 0 = values <= t (first max)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    levels = np.arange(256)
    mu_total = (p * levels).sum()
    best_t, best = 0, -1.0
    for t in range(256):
        w0 = p[: t + 1].sum()
        w1 = 1 - w0
        if w0 == 0 or w1 == 0:
            continue
        mu0 = (p[: t + 1] * levels[: t + 1]).sum() / w0
        mu1 = (p[t + 1 :] * levels[t + 1 :]).sum() / w1
        between = w0 * (mu0 - mu_total) ** 2 + w1 * (mu1 - mu_total) ** 2
        if between > best + 1e-9:
            best_t, best = t, between
    return best_t


def closing_reference(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """(A dilate B) erode B, written out as two explicit OpenCV calls."""
    dilated = cv2.dilate(mask.astype(np.uint8), kernel)
    return cv2.erode(dilated, kernel).astype(bool)


def test_ellipse_5x5_is_the_papers_structuring_element():
    expected = np.array(
        [
            [0, 0, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [0, 0, 1, 0, 0],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(seg.structuring_element(5, "ellipse"), expected)
    assert seg.structuring_element(3, "rect").sum() == 9
    assert seg.structuring_element(3, "cross").sum() == 5
    np.testing.assert_array_equal(seg.structuring_element(1), [[1]])


def test_otsu_two_levels_known_answer():
    # Two flat populations: every t in [10, 199] separates them equally; the first wins.
    values = np.array([[10] * 5 + [200] * 20], dtype=np.uint8).reshape(5, 5)
    assert seg.otsu_threshold(values) == 10
    assert numpy_otsu(values) == 10
    assert threshold_otsu(values) == 10
    mask, t = seg.otsu_mask(values, "dark")
    np.testing.assert_array_equal(mask, values == 10)
    mask, t = seg.otsu_mask(values, "bright")
    np.testing.assert_array_equal(mask, values == 200)


def test_otsu_three_levels_known_answer():
    # 0 x4, 100 x4, 255 x17: splitting 100 from 255 maximises the between-class variance.
    values = np.array([0] * 4 + [100] * 4 + [255] * 17, dtype=np.uint8).reshape(5, 5)
    assert numpy_otsu(values) == 100
    assert seg.otsu_threshold(values) == 100


@pytest.mark.parametrize("seed", range(20))
def test_otsu_matches_numpy_formula_and_skimage_on_random_mixtures(seed):
    rng = np.random.default_rng(seed)
    n = 40 * 40
    first = rng.normal(rng.uniform(40, 110), rng.uniform(5, 25), n // 3)
    second = rng.normal(rng.uniform(140, 220), rng.uniform(5, 25), n - n // 3)
    values = np.clip(np.concatenate([first, second]), 0, 255).astype(np.uint8).reshape(40, 40)
    t = seg.otsu_threshold(values)
    assert t == numpy_otsu(values)
    assert t == threshold_otsu(values)


def test_otsu_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        seg.otsu_threshold(np.zeros((4, 4), np.float32))


def test_closing_fills_a_hole_and_bridges_a_gap():
    kernel = seg.structuring_element(3, "rect")
    hole = np.ones((7, 7), bool)
    hole[3, 3] = False
    np.testing.assert_array_equal(seg.close_mask(hole, kernel), np.ones((7, 7), bool))
    gap = np.zeros((9, 11), bool)
    gap[3:6, 2:5] = True
    gap[3:6, 6:9] = True  # one empty column between two blocks, away from the border
    closed = seg.close_mask(gap, kernel)
    np.testing.assert_array_equal(closed & ~gap, np.pad(np.ones((3, 1), bool), ((3, 3), (5, 5))))


def test_closing_at_the_border_follows_opencv():
    # OpenCV's default border: outside is background when dilating and foreground when eroding,
    # so a shape one pixel from the edge grows to the edge (as cv2.morphologyEx does).
    kernel = seg.structuring_element(3, "rect")
    near_edge = np.zeros((5, 5), bool)
    near_edge[1:4, 1:4] = True
    near_edge[2, 2] = False
    closed = seg.close_mask(near_edge, kernel)
    np.testing.assert_array_equal(closed, closing_reference(near_edge, kernel))
    assert closed[2, 2] and closed[2, 0]


def test_closing_never_removes_foreground_and_matches_dilate_then_erode():
    rng = np.random.default_rng(0)
    kernel = seg.structuring_element(5, "ellipse")
    for _ in range(10):
        mask = rng.random((32, 32)) > 0.6
        closed = seg.close_mask(mask, kernel)
        assert (closed | ~mask).all(), "closing is extensive: A is a subset of I"
        np.testing.assert_array_equal(closed, closing_reference(mask, kernel))


@pytest.mark.parametrize("bad", [0, -3, 4, 2.0, "5", True])
def test_bad_kernel_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="odd integer from 1 to 255"):
        seg.structuring_element(bad)
    with pytest.raises(ValueError, match="odd integer from 1 to 255"):
        SegmentationParams(kernel_size=bad)


@pytest.mark.parametrize(
    "field, value",
    [("channel", "hue"), ("kernel_shape", "disk"), ("output", "rgb"), ("foreground", "cells")],
)
def test_unknown_choices_name_the_valid_ones(field, value):
    with pytest.raises(ValueError, match=f"unsupported {field}, got '{value}'; expected one of"):
        SegmentationParams(**{field: value})


def reference_model_input(rgb: np.ndarray) -> np.ndarray:
    """The issue's definition, built from OpenCV's BGR2GRAY and the NumPy Otsu above."""
    gray = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, ::-1]), cv2.COLOR_BGR2GRAY)
    mask = gray <= numpy_otsu(gray)  # cells darker than the background are foreground
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    closed = closing_reference(mask, kernel)
    return np.repeat(np.where(closed, gray, 0)[:, :, None], 3, axis=2).astype(np.uint8)


def test_default_output_equals_the_definition_pixel_for_pixel():
    for index in range(3):
        rgb, _ = synthetic.make_image(5, "Pre-B", index)
        np.testing.assert_array_equal(seg.preprocess_image(rgb), reference_model_input(rgb))
        np.testing.assert_array_equal(seg.segment(rgb)["output"], reference_model_input(rgb))


def test_gray_uses_opencv_weights():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [100, 150, 200]]], np.uint8)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert np.abs(seg.to_gray(rgb).astype(float) - expected).max() <= 0.5 + 1e-9


def test_channels_polarity_and_outputs():
    rgb, _ = synthetic.make_image(1, "Pro-B", 0)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    np.testing.assert_array_equal(seg.threshold_channel(rgb, "saturation"), hsv[:, :, 1])
    np.testing.assert_array_equal(seg.threshold_channel(rgb, "lab-a"), lab[:, :, 1])
    assert SegmentationParams(channel="saturation").resolved_foreground == "bright"
    assert SegmentationParams(channel="gray").resolved_foreground == "dark"
    assert SegmentationParams(channel="gray", foreground="bright").resolved_foreground == "bright"

    dark = seg.segment(rgb, SegmentationParams(kernel_size=1))
    bright = seg.segment(rgb, SegmentationParams(kernel_size=1, foreground="bright"))
    np.testing.assert_array_equal(dark["mask"], ~bright["mask"])  # no closing: complements

    mask_out = seg.preprocess_image(rgb, SegmentationParams(output="mask"))
    assert set(np.unique(mask_out)) <= {0, 255}
    np.testing.assert_array_equal(mask_out[:, :, 0] == 255, seg.segment(rgb)["mask"])
    baseline = seg.preprocess_image(rgb, SegmentationParams(segment=False, image_size=64))
    assert baseline.shape == (64, 64, 3)
    np.testing.assert_array_equal(baseline, seg.resize(rgb, 64))


def test_gray_output_is_the_whole_grayscale_image_in_three_channels():
    """The gray arm's input: OpenCV's weights on the resized image, no mask, in each channel;
    what preprocess stores (one plane) and what serving computes (three) agree."""
    params = SegmentationParams(output="gray", image_size=64)
    rgb, _ = synthetic.make_image(3, "Pro-B", 0)
    resized = seg.resize(rgb, 64).astype(np.float64)
    expected = np.round(resized @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    plane, _ = seg.preprocess_planes(rgb, params)
    assert plane.shape == (64, 64)
    assert np.abs(plane.astype(int) - expected).max() <= 1  # OpenCV's fixed-point rounding
    served = seg.preprocess_image(rgb, params)
    assert served.shape == (64, 64, 3) and all((served[:, :, c] == plane).all() for c in range(3))
    np.testing.assert_array_equal(seg.segment(rgb, params)["output"], served)


def test_masked_rgb_keeps_the_colours_inside_the_closed_mask():
    """The reference: the paper's closed mask (numpy Otsu, the 5x5 ellipse) times the resized
    RGB image, channel by channel; what preprocess stores and what serving computes agree."""
    params = SegmentationParams(output="masked-rgb")
    for index in range(3):
        rgb, _ = synthetic.make_image(7, "Early Pre-B", index)
        gray = seg.to_gray(rgb)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        closed = closing_reference(gray <= numpy_otsu(gray), kernel)
        expected = np.where(closed[:, :, None], rgb, 0).astype(np.uint8)
        np.testing.assert_array_equal(seg.preprocess_image(rgb, params), expected)
        np.testing.assert_array_equal(seg.segment(rgb, params)["output"], expected)
        stored, _ = seg.preprocess_planes(rgb, params)
        assert stored.shape == rgb.shape and not np.array_equal(stored[..., 0], stored[..., 2])


def test_resize_only_when_needed():
    rgb = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    out = seg.preprocess_image(rgb, SegmentationParams(image_size=224))
    assert out.shape == (224, 224, 3)
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
    same = np.zeros((224, 224, 3), np.uint8)
    assert seg.resize(same, 224) is same


def test_dark_foreground_isolates_synthetic_nuclei():
    """On the synthetic smears the closed dark mask is the nuclei (median IoU per class)."""
    for class_name in synthetic.LAYOUT:
        ious = []
        for index in range(12):
            rgb, nuclei = synthetic.make_image(0, class_name, index)
            mask = seg.segment(rgb)["mask"]
            ious.append((mask & nuclei).sum() / (mask | nuclei).sum())
        assert np.median(ious) > 0.85, (class_name, ious)


@requires_real_data
def test_otsu_on_real_images_matches_numpy_and_skimage():
    paths = sorted(REAL_DATA.rglob("*.jpg"))[::60]
    assert len(paths) > 30
    for path in paths:
        gray = seg.to_gray(images.read_image(path))
        t = seg.otsu_threshold(gray)
        assert t == numpy_otsu(gray), path
        assert t == threshold_otsu(gray), path
        np.testing.assert_array_equal(
            seg.preprocess_image(images.read_image(path)),
            reference_model_input(images.read_image(path)),
        )


def test_synthetic_classes_are_learnable_from_the_segmented_images():
    """A linear model on the segmented images' foreground area and gray histogram separates the
    synthetic classes (a floor for what a CNN should reach in a few epochs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = [], []
    for label, class_name in enumerate(synthetic.LAYOUT):
        for index in range(40):
            rgb, _ = synthetic.make_image(11, class_name, index, size=112)
            plane = seg.preprocess_image(rgb, SegmentationParams(image_size=112))[:, :, 0]
            hist = np.bincount(plane[plane > 0] // 16, minlength=16) / max(1, (plane > 0).sum())
            features.append([(plane > 0).mean(), *hist])
            labels.append(label)
    features, labels = np.array(features), np.array(labels)
    train = np.arange(len(labels)) % 4 != 0
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(features[train], labels[train])
    assert model.score(features[~train], labels[~train]) >= 0.8


def _lab(rgb: np.ndarray) -> np.ndarray:
    # An independent reference: scikit-image's CIE LAB (L in [0, 100], a and b signed). Not
    # OpenCV's float conversion, whose thread pool hangs a later forked preprocess worker.
    from skimage.color import rgb2lab

    return rgb2lab(rgb).reshape(-1, 3)


def test_stain_reference_matches_independent_lab_statistics():
    rng = np.random.default_rng(0)
    rgbs = [rng.integers(40, 200, (16, 24, 3), dtype=np.uint8) for _ in range(3)]
    reference = seg.fit_stain_reference(rgbs)
    lab = np.concatenate([_lab(x) for x in rgbs])
    np.testing.assert_allclose(reference[:3], lab.mean(axis=0), atol=0.15)
    np.testing.assert_allclose(reference[3:], lab.std(axis=0), atol=0.15)


def test_stain_normalisation_undoes_exposure_and_matches_the_reference():
    rng = np.random.default_rng(1)
    rgb = rng.integers(60, 190, (32, 32, 3), dtype=np.uint8)
    reference = seg.fit_stain_reference([rng.integers(30, 220, (32, 32, 3), dtype=np.uint8)])
    normalised = seg.normalise_stain(rgb, reference)
    lab = _lab(normalised)
    np.testing.assert_allclose(lab.mean(axis=0), reference[:3], atol=1.0)
    np.testing.assert_allclose(lab.std(axis=0), reference[3:], rtol=0.05)
    darker = seg.normalise_stain(np.rint(rgb * 0.6).astype(np.uint8), reference)
    assert np.abs(darker.astype(int) - normalised).mean() < 2  # exposure no longer shows
    flat = np.full((8, 8, 3), 100, np.uint8)
    np.testing.assert_array_equal(seg.normalise_stain(flat, reference), flat)  # nothing to match


@pytest.mark.parametrize(
    "reference", [(1, 2, 3), (1, 2, 3, 4, 5, 0), (1, 2, 3, 4, 5, float("nan")), "abcdef", None]
)
def test_bad_stain_references_are_refused(reference):
    with pytest.raises(ValueError, match="stain reference of 6 finite numbers"):
        seg.check_stain_reference(reference)
    with pytest.raises(ValueError, match="unsupported stain_norm, got 'macenko'"):
        SegmentationParams(stain_norm="macenko")


def test_stain_normalisation_without_torchstain_is_one_line():
    # A real interpreter in which torchstain cannot be imported (as in an environment that
    # predates the dependency): one line naming the package, not a ModuleNotFoundError.
    code = (
        "import sys; sys.modules['torchstain'] = None\n"
        "import numpy as np; from leukemia import segmentation as seg\n"
        "try:\n"
        "    seg.fit_stain_reference([np.zeros((8, 8, 3), np.uint8)])\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("stain_norm reinhard needs torchstain, which is not installed")
