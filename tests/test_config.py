"""Configuration layering: defaults (the paper) -> YAML -> overrides; unknown keys fail."""

from __future__ import annotations

from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# Preprocessing: one declaration of every default


def test_paper_yaml_states_the_papers_preprocessing():
    from leukemia.config import PreprocessConfig, load_experiment

    train, preprocess = load_experiment(REPO / "experiments" / "paper.yaml")
    assert preprocess == PreprocessConfig() and train == TrainConfig()
    assert (preprocess.channel, preprocess.kernel_size, preprocess.kernel_shape) == (
        "gray",
        5,
        "ellipse",
    )


def test_cli_and_mlproject_leave_every_default_to_the_config():
    """A default lives in the dataclasses only: a CLI option or MLproject parameter that
    declared its own could disagree with them (kernel_size was written in five places)."""
    import dataclasses

    import yaml

    from leukemia.cli import main
    from leukemia.config import PreprocessConfig

    fields = [f.name for f in dataclasses.fields(PreprocessConfig)]
    for name in ("preprocess", "train", "compare", "main"):
        params = {p.name: p for p in main.commands[name].params}
        for field in fields:
            if field == "segment" and name in ("compare", "main"):
                continue  # a study runs both arms
            assert field in params, (name, field)
            assert params[field].default is None, (name, field, params[field].default)
            assert f"else {getattr(PreprocessConfig, field)}]" in params[field].help
    project = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    for name in ("preprocess", "train", "compare", "main"):
        declared = project[name]["parameters"]
        for field in fields:
            if field == "segment" and name in ("compare", "main"):
                continue
            assert declared[field] == {"type": "string", "default": ""}, (name, field)
            flag = "--" + field.replace("_", "-")
            assert f"{flag} {{{field}}}" in project[name]["command"], (name, flag)
    assert project["train"]["parameters"]["seed"] == {"type": "string", "default": ""}


def test_a_preprocess_block_flows_into_the_run_and_options_win(tmp_path, tracking_uri):
    import json

    from click.testing import CliRunner

    from leukemia.cli import main

    config = tmp_path / "kernel9.yaml"
    config.write_text("image_size: 64\npreprocess:\n  kernel_size: 9\n  kernel_shape: cross\n")
    runner = CliRunner()
    common = ["preprocess", "--synthetic-per-class", "8", "--json", "--config", str(config)]
    result = runner.invoke(main, common)
    assert result.exit_code == 0, result.output
    params = json.loads(
        Path(json.loads(result.output.splitlines()[-1])["out_dir"], "params.json").read_text()
    )
    assert params["segmentation"]["kernel_size"] == 9
    assert params["segmentation"]["kernel_shape"] == "cross"
    assert params["segmentation"]["image_size"] == 64
    result = runner.invoke(main, [*common, "--kernel-size", "7", "--kernel-shape", ""])
    assert result.exit_code == 0, result.output
    params = json.loads(
        Path(json.loads(result.output.splitlines()[-1])["out_dir"], "params.json").read_text()
    )
    assert params["segmentation"]["kernel_size"] == 7  # the option wins
    assert params["segmentation"]["kernel_shape"] == "cross"  # "" leaves it to the config

    config.write_text("preprocess:\n  kernel: 9\n")
    result = runner.invoke(main, common)
    assert result.exit_code == 1
    assert "unknown config key(s) ['kernel'] in the preprocess block" in result.output
