"""Configuration layering: defaults (the paper) -> YAML -> overrides; unknown keys fail."""

from __future__ import annotations

import dataclasses
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
        ({"exposure_jitter": float("nan")}, r"exposure_jitter must be in \[0, 3.0\], got nan"),
        ({"exposure_jitter": 4}, r"exposure_jitter must be in \[0, 3.0\], got 4"),
    ],
)
def test_bad_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"config file '.*' is a folder; expected an experiment"):
        load_config(tmp_path)  # base: /etc
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


def test_a_setting_is_declared_by_its_dataclass_only():
    """No command option or MLproject parameter declares a preprocessing field (kernel_size
    was once written in six places): each is a --field VALUE override, listed in the help from
    the dataclass with its default and help."""
    import yaml

    from leukemia.cli import main
    from leukemia.config import PREPROCESS_FIELDS, PreprocessConfig

    for name in ("preprocess", "train", "compare", "main", "search"):
        command = main.commands[name]
        declared = {p.name for p in command.params}
        assert not declared & set(PREPROCESS_FIELDS), name
        assert command.context_settings.get("ignore_unknown_options"), name
    epilog = main.commands["train"].epilog
    for field in dataclasses.fields(PreprocessConfig):
        assert f"--{field.name} {field.default!r}: {field.metadata['help']}" in epilog
    project = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    for name, entry in project.items():
        assert not set(entry.get("parameters", {})) & set(PREPROCESS_FIELDS), name


def test_fields_route_by_name_wherever_they_are_given(tmp_path):
    from leukemia.config import load_experiment

    path = tmp_path / "c.yaml"
    path.write_text("image_size: 96\nbatch_size: 4\npreprocess:\n  kernel_size: 7\n")
    train, pre = load_experiment(path, {"channel": "lab-a", "phase1_lr": "0.01"})
    assert (pre.image_size, pre.kernel_size, pre.channel) == (96, 7, "lab-a")
    assert (train.batch_size, train.phase1_lr) == (4, 0.01)
    path.write_text("image_size: 96\npreprocess:\n  image_size: 64\n")
    with pytest.raises(ValueError, match="both at the top level and in the preprocess block"):
        load_experiment(path)
    path.write_text("preprocess:\n  batch_size: 4\n")
    with pytest.raises(ValueError, match="holds training fields"):
        load_experiment(path)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['kernel'\] in the overrides"):
        load_experiment(None, {"kernel": 3})


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
