"""The arms table: which preprocessing names which arm, and the --arms option's checks."""

from __future__ import annotations

import pytest

from leukemia.arms import ARMS, DEEP_ARMS, arm_of, by_name, parse_deep_arms
from leukemia.config import PreprocessConfig, TrainConfig


def test_every_deep_arm_is_named_by_its_own_settings():
    for arm in DEEP_ARMS:
        fields = PreprocessConfig(**by_name(arm).preprocess_fields()).to_dict()
        training = TrainConfig(**by_name(arm).train_fields(TrainConfig().to_dict())).to_dict()
        assert arm_of(fields, training) == arm


@pytest.mark.parametrize(
    "fields, arm",
    [
        ({"segment": False, "channel": "lab-a"}, "baseline"),  # unsegmented: nothing else counts
        ({"segment": True, "channel": "gray", "output": "masked"}, "proposed"),
        ({"segment": True, "channel": "saturation", "output": "mask"}, "proposed"),  # any other
        ({"segment": "True", "channel": "lab-a", "output": "masked"}, "lab-a"),  # logged strings
        ({"segment": True, "channel": "saturation", "output": "masked-rgb"}, "masked-rgb"),
        ({"segment": True, "channel": "lab-a", "output": "masked-rgb"}, "lab-a"),  # first match
        ({"segment": True, "channel": "gray", "output": "gray"}, "gray"),
        ({"segment": True, "channel": "lab-a", "output": "gray"}, "gray"),  # channel unused
        ({"segment": "False", "channel": "lab-a", "output": "gray"}, "baseline"),
    ],
)
def test_arm_of(fields, arm):
    assert arm_of(fields) == arm


@pytest.mark.parametrize(
    "segment, jitter, arm",
    [(False, 0.4, "colour-jitter"), (False, "0.1", "colour-jitter"), (False, 0.0, "baseline")]
    + [(True, 0.4, "proposed"), (False, None, "baseline"), (False, "off", "baseline")],
)
def test_a_training_knob_names_an_arm(segment, jitter, arm):
    assert arm_of({"segment": segment}, {"colour_jitter": jitter}) == arm


def test_the_combined_arm_needs_both_parts():
    stain = {"segment": False, "stain_norm": "reinhard"}
    assert arm_of(stain, {"colour_jitter": 0.6}) == "stain-norm-jitter"
    assert arm_of(stain, {"colour_jitter": 0.0}) == "stain-norm"
    assert arm_of({"segment": False, "stain_norm": "none"}, {"colour_jitter": 0.6}) == (
        "colour-jitter"
    )
    assert by_name("stain-norm-jitter").train_fields({"colour_jitter": 0.0}) == {
        "colour_jitter": 0.6
    }


def test_exposure_norm_names_its_arm_as_a_value_or_as_logged_text():
    raw = {"segment": False}
    assert arm_of(raw, {"exposure_norm": True, "colour_jitter": 0.4}) == "exposure-norm"
    assert arm_of(raw, {"exposure_norm": "True", "colour_jitter": "0.4"}) == "exposure-norm"
    assert arm_of(raw, {"exposure_norm": "False", "colour_jitter": "0.4"}) == "colour-jitter"
    assert by_name("exposure-norm").train_fields({"colour_jitter": 0.0}) == {
        "exposure_norm": True,
        "colour_jitter": 0.4,
    }


def test_exposure_aug_needs_all_three_knobs():
    raw = {"segment": False}
    knobs = {"exposure_norm": "True", "colour_jitter": "0.4", "exposure_jitter": "0.8"}
    assert arm_of(raw, knobs) == "exposure-aug"
    assert arm_of(raw, {**knobs, "exposure_jitter": "0.0"}) == "exposure-norm"
    assert by_name("exposure-aug").train_fields({"colour_jitter": 0.0}) == {
        "exposure_norm": True,
        "colour_jitter": 0.4,
        "exposure_jitter": 0.8,
    }


def test_an_arm_keeps_a_knob_the_study_turned_on():
    jitter = by_name("colour-jitter")
    assert jitter.train_fields({"colour_jitter": 0.0}) == {"colour_jitter": 0.4}
    assert jitter.train_fields({"colour_jitter": 0.2}) == {}
    assert by_name("baseline").train_fields({"colour_jitter": 0.0}) == {}


def test_shortcut_arms_read_a_deep_arms_images():
    assert {a.name: a.images for a in ARMS if a.features} == {
        "shortcut-rgb": "baseline",
        "shortcut-gray": "baseline",
        "shortcut-gray-segmented": "proposed",
        "shortcut-background": "baseline",
    }


@pytest.mark.parametrize("text", ["", "baseline,nope", "baseline,baseline", "shortcut-rgb", ","])
def test_parse_deep_arms_rejects(text):
    with pytest.raises(ValueError, match="arms must be distinct deep arms from baseline"):
        parse_deep_arms(text)


def test_parse_deep_arms_keeps_order():
    assert parse_deep_arms(" masked-rgb, baseline ") == ("masked-rgb", "baseline")
