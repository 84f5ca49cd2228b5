"""The ``leukemia`` command line as a user meets it, and what it leaves in MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from leukemia.cli import main

from .conftest import REPO, mlflow_run_env


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in (
        "synth",
        "preprocess",
        "train",
        "compare",
        "evaluate",
        "promote",
        "predict",
        "main",
    ):
        assert command in result.output
        sub = invoke(command, "--help")
        assert sub.exit_code == 0 and "Usage:" in sub.output


def test_synth_is_deterministic(tmp_path):
    assert invoke("synth", tmp_path / "a", "--per-class", 2, "--seed", 4).exit_code == 0
    assert invoke("synth", tmp_path / "b", "--per-class", 2, "--seed", 4).exit_code == 0
    assert invoke("synth", tmp_path / "c", "--per-class", 2, "--seed", 5).exit_code == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert [str(f) for f in files][:2] == [
        "Benign/WBC-Benign-001.jpg",
        "Benign/WBC-Benign-002.jpg",
    ]
    assert len(files) == 8
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kernel-size", "4"], "must be an odd integer from 1 to 255, got 4"),
        (["--kernel-size", "0"], "must be an odd integer from 1 to 255, got 0"),
        (["--kernel_size", "100001"], "must be an odd integer from 1 to 255, got 100001"),
        (["--kernel-size", "x"], "kernel_size must be int, got 'x'"),
        (["--image-size", "100000"], "image_size must be from 8 to 2048 pixels, got 100000"),
        (["--channel", "hue"], "unsupported channel, got 'hue'; expected one of gray, saturation"),
        (["--split-fractions", "0.8,0.15,0.15"], "must sum to 1"),
        (["--group-by", "patient"], "unsupported group_by, got 'patient'; expected image or"),
        (["--kernel-size"], "override --kernel-size has no value"),
        (["--phase1_epochs", "3"], "preprocess takes preprocessing fields only"),
        (["--colour", "red"], "unknown config key(s) ['colour'] in the overrides; valid keys:"),
    ],
)
def test_bad_options_are_one_line_errors(args, message, tracking_uri):
    result = invoke("preprocess", *args)
    assert result.exit_code in (1, 2)
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_bad_data_is_a_one_line_error(tmp_path, tracking_uri, dataset_copy):
    result = invoke("preprocess", "--data-dir", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "Error: data directory" in result.output and "does not exist" in result.output
    (dataset_copy / "Monocytes").mkdir()
    result = invoke("preprocess", "--data-dir", dataset_copy, "--out-dir", tmp_path / "o")
    assert result.exit_code == 1 and "unknown class folder(s) ['Monocytes']" in result.output
    assert not (tmp_path / "o").exists()
    (dataset_copy / "Monocytes").rmdir()
    result = invoke(
        "preprocess", "--data-dir", dataset_copy, "--manifest", tmp_path / "missing.csv"
    )
    assert result.exit_code == 1 and "missing.csv' does not exist" in result.output
    assert "Traceback" not in result.output


def test_preprocess_logs_a_complete_run(tracking_uri, synthetic_dir, tmp_path):
    result = invoke(
        "preprocess",
        "--data-dir",
        synthetic_dir,
        "--out-dir",
        tmp_path / "out",
        "--kernel-size",
        3,
        "--experiment",
        "audit-test",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "audit-test"
    assert run.data.params["segmentation.kernel_size"] == "3"
    assert run.data.params["split.fractions"] == "0.7,0.15,0.15"
    assert run.data.params["cache_key"] == summary_key(tmp_path / "out")
    assert run.data.tags["arm"] == "proposed" and run.data.tags["cache_hit"] == "false"
    assert run.data.tags["preprocess.kernel_shape"] == "ellipse"
    assert run.data.metrics["images"] == 32 and run.data.metrics["test_images"] == 4
    assert run.data.metrics["images_per_second"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"manifest.csv", "audit.json", "params.json", "preview.png"}
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "manifest"

    again = invoke(
        "preprocess",
        "--data-dir",
        synthetic_dir,
        "--out-dir",
        tmp_path / "out",
        "--kernel-size",
        3,
        "--experiment",
        "audit-test",
        "--json",
    )
    second = json.loads(again.output.strip().splitlines()[-1])
    assert second["cache_hit"] is True
    assert client.get_run(second["run_id"]).data.tags["cache_hit"] == "true"


def summary_key(out_dir: Path) -> str:
    return json.loads((out_dir / "latest" / "params.json").read_text())["cache_key"]


@pytest.mark.slow
def test_mlproject_entry_point_runs_with_mlflow_run(tmp_path):
    """``mlflow run . -e preprocess`` as the README shows it, in this environment."""
    env = mlflow_run_env(tmp_path)
    out = tmp_path / "processed"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(REPO),
        "-e",
        "preprocess",
        "--env-manager",
        "local",
        "--experiment-name",
        "mlproject",
        "-P",
        "synthetic_per_class=8",
        "-P",
        "kernel_size=3",
        "-P",
        f"out_dir={out}",
    ]
    # cwd: MLflow puts a SQLite store's artifacts under ./mlruns of the process making them.
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        runs = mlflow.search_runs(experiment_names=["mlproject"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["segmentation.kernel_size"] == "3"
    assert run.data.metrics["images"] == 32
    assert (out / "latest" / "manifest.csv").is_file()

    bad = subprocess.run(
        [c.replace("kernel_size=3", "kernel_size=4") for c in command],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert bad.returncode != 0
    assert "must be an odd integer from 1 to 255, got 4" in bad.stderr
