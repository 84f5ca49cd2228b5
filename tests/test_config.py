"""Configuration layering: defaults (the paper) -> YAML -> overrides; unknown keys fail."""

from __future__ import annotations

import pytest

from leukemia.config import TrainConfig, load_config

from .conftest import REPO


def test_defaults_are_the_paper_and_paper_yaml_states_them():
    paper = load_config(REPO / "experiments" / "paper.yaml")
    assert paper == TrainConfig()
    assert (paper.model, paper.batch_size, paper.phase1_lr, paper.weight_decay) == (
        "efficientnet_b4",
        8,
        1e-4,
        1e-4,
    )
    assert (paper.phase1_epochs, paper.phase2_epochs, paper.unfreeze_last, paper.patience) == (
        50,
        30,
        60,
        7,
    )


def test_overrides_win_and_strings_are_coerced(tmp_path):
    config = load_config(
        REPO / "experiments" / "demo.yaml",
        {"batch_size": "4", "class_weights": "false", "phase1_lr": "2e-3"},
    )
    assert config.model == "test_efficientnet"
    assert (config.batch_size, config.class_weights, config.phase1_lr) == (4, False, 2e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learning_rate": 1}, r"unknown config key\(s\) \['learning_rate'\].*valid keys: model"),
        ({"batch_size": "eight"}, "batch_size must be int, got 'eight'"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"class_weights": "maybe"}, "class_weights must be bool"),
        ({"precision": "fp8"}, "unsupported precision"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("batchsize: 8\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['batchsize'\]"):
        load_config(tmp_path / "typo.yaml")
