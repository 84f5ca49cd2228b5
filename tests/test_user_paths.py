"""The users' three paths as they type them: the headline `mlflow run . -e train -P
segment=true`, one set of defaults everywhere, and what a train run shows in the MLflow UI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from leukemia.cli import main
from leukemia.config import DEFAULT_CONFIG, TrainConfig

from .conftest import REPO

COPY_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "processed", "mlflow.db", "mlruns", "__pycache__", "*.egg-info", "docs"
)


def test_every_entry_point_and_command_defaults_to_the_demo():
    """One set of defaults: synthetic data and experiments/demo.yaml, whatever runs."""
    project = yaml.safe_load((REPO / "MLproject").read_text())
    for name, entry in project["entry_points"].items():
        parameters = entry["parameters"]
        if "config" in parameters:
            assert parameters["config"]["default"] == DEFAULT_CONFIG, name
        if "data_dir" in parameters:
            assert parameters["data_dir"]["default"] == "synthetic", name
        assert entry["command"].startswith("python -m leukemia "), name
    for name in ("preprocess", "train", "compare", "main"):
        (config,) = [p for p in main.commands[name].params if p.name == "config_path"]
        (data,) = [p for p in main.commands[name].params if p.name == "data_dir"]
        assert config.default == DEFAULT_CONFIG and data.default == "synthetic", name
    python = yaml.safe_load((REPO / "python_env.yaml").read_text())["python"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", python), "a full version: pyenv finds it installed"


def test_train_help_lists_every_config_field_and_one_option_per_switch():
    text = CliRunner().invoke(main, ["train", "--help"]).output
    for field in fields(TrainConfig):
        assert f"--{field.name} " in text, field.name
    preprocess = CliRunner().invoke(main, ["preprocess", "--help"]).output
    compare = CliRunner().invoke(main, ["compare", "--help"]).output
    assert "--no-segment" not in preprocess
    assert "--shortcuts-enabled" not in compare and "--no-shortcuts" not in compare


def test_a_train_run_reads_well_in_the_ui_and_the_terminal(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--synthetic-per-class", "8", "--phase1_epochs", "1", "--phase2_epochs", "2"]
    result = CliRunner().invoke(main, [*args, "--patience", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # Each epoch's losses and accuracies, then the run, its metrics and what to do next.
    epochs = re.findall(
        r"epoch +(\d) phase\d: train loss [\d.]+ acc [\d.]+ \| val loss", result.output
    )
    assert epochs == ["1", "2", "3"], result.output
    assert "registered: leukemia-classifier version 1, alias @challenger" in result.output
    assert "leukemia promote 1" in result.output and "leukemia compare" in result.output
    assert "leukemia serve -m models:/leukemia-classifier/1" in result.output

    (run,) = mlflow.search_runs(experiment_names=["leukemia"], output_format="list")
    client = MlflowClient()
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name == "proposed seed 42"
    note = run.data.tags["mlflow.note.content"]
    assert "**proposed arm**, seed 42" in note and "experiments/demo.yaml" in note
    assert f"| {run.data.metrics['test_accuracy']:.4f} |" in note
    assert "leukemia-classifier version 1" in note
    # Paths are tags, not params: two machines' runs of the same thing have the same params.
    assert not [v for v in run.data.params.values() if str(v).startswith(str(tmp_path))]
    assert Path(run.data.tags["data.processed_dir"], "manifest.csv").is_file()
    # Where its training state lives, so a sweep can tell whether --resume would work.
    assert run.data.tags["runtime.state_file"].endswith(f"{run.info.run_id}/state.pt")
    # Confusion matrices per validation epoch and on test, and the curves, as keyed images.
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    logged = [re.match(r"images/(\w+)\+step\+(\d+)\+", path).groups() for path in images]
    steps = {key: sorted(int(n) for k, n in logged if k == key) for key, _ in logged}
    # Each image is logged with a compressed thumbnail: two files per step. End-of-training
    # images at step 0, where the chart view's image card opens (issue 21).
    assert steps == {
        "val_confusion": [1, 1, 2, 2, 3, 3],
        "test_confusion": [0, 0],
        "curves": [0, 0],
    }, images


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("pyenv") is None, reason="MLflow's default environment manager needs pyenv"
)
def test_the_headline_command_runs_as_typed(tmp_path):
    """`mlflow run . -e train -P segment=true` with MLflow's default environment manager, in a
    copy of the project with nothing else set: it builds (or reuses) its environment from
    python_env.yaml and trains the demo on synthetic data."""
    project = tmp_path / "project"
    shutil.copytree(REPO, project, ignore=COPY_IGNORE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LEUKEMIA_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["LEUKEMIA_CACHE_DIR"] = str(tmp_path / "cache")  # not the user's cache
    command = ["mlflow", "run", ".", "-e", "train", "-P", "segment=true"]
    done = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=1500
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "registered: leukemia-classifier version 1, alias @challenger" in output
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.env"] == "virtualenv"
    assert run.data.params["segment"] == "true" and run.data.params["config"] == DEFAULT_CONFIG
    assert run.data.params["config.model"] == "test_efficientnet"
    assert 0 <= run.data.metrics["test_accuracy"] <= 1
