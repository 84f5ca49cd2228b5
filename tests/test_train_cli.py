"""``leukemia train`` as a user meets it: what a run logs, bad input, kill and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from leukemia.cli import main
from leukemia.steps import evaluate as evaluate_step

from .conftest import REPO, mlflow_run_env

DEMO = str(REPO / "experiments" / "demo.yaml")
# Tiny and quick: 8 synthetic images per class, one epoch per phase.
TINY = [
    "--synthetic-per-class",
    "8",
    "--config",
    DEMO,
    "--phase1_epochs",
    "1",
    "--phase2_epochs",
    "1",
    "--patience",
    "0",
]


def invoke(*args):
    return CliRunner().invoke(main, ["train", *[str(a) for a in args]], catch_exceptions=False)


def runs(experiment: str = "leukemia"):
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def test_a_train_run_leaves_everything_in_mlflow(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*TINY, "--segment", "false", "--batch-size=8")
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    (run,) = runs()
    data, run_id = run.data, run.info.run_id
    assert run.info.status == "FINISHED"
    assert data.tags["arm"] == "baseline" and data.tags["preprocess.segment"] == "False"
    assert data.params["config.batch_size"] == "8"  # the --key=value override
    assert data.params["config.model"] == "test_efficientnet"
    assert data.params["runtime.device"] == "cpu" and data.params["runtime.precision"] == "fp32"
    assert len(data.params["data.manifest_hash"]) == 64
    counts = [int(data.params[f"data.{s}_pre_b"]) for s in ("train", "val", "test")]
    assert sum(counts) == 8
    for key in ("train_loss", "val_loss", "val_accuracy", "lr", "images_per_second"):
        assert [step for step, _ in history(run_id, key)] == [1, 2], key
    metrics = data.metrics
    assert metrics["phase1_best_epoch"] == 1 and metrics["phase2_start_epoch"] == 2
    assert metrics["phase1_trainable_params"] < metrics["phase2_trainable_params"]
    for key in ("test_accuracy", "test_f1_macro", "test_f1_weighted", "test_f1_micro"):
        assert 0 <= metrics[key] <= 1 and 0 <= metrics[f"phase1_{key}"] <= 1
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id)}
    artifacts |= {a.path for a in MlflowClient().list_artifacts(run_id, "evaluation")}
    for name in (
        "curves.png",
        "history.json",
        "evaluation/confusion_matrix.png",
        "evaluation/classification_report.txt",
        "evaluation/predictions.csv",
    ):
        assert name in artifacts, name
    inputs = {i.dataset.name: [t.value for t in i.tags] for i in run.inputs.dataset_inputs}
    assert inputs == {"manifest": ["training"], "val": ["validation"], "test": ["testing"]}
    # Each phase's best checkpoint is a logged model at its epoch, holding the two data files,
    # with the validation and test metrics it scored linked to it and to their datasets.
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    by_name = {m.name: m for m in models}
    assert set(by_name) == {"phase1-best", "phase2-best", "classifier"}
    steps = {o.model_id: o.step for o in run.outputs.model_outputs}
    assert steps[by_name["phase1-best"].model_id] == metrics["phase1_best_epoch"] == 1
    linked = {(m.key, m.dataset_name) for m in by_name["phase1-best"].metrics}
    assert {("phase1_best_val_loss", "val"), ("phase1_test_accuracy", "test")} <= linked
    linked = {(m.key, m.dataset_name) for m in by_name["classifier"].metrics}
    assert ("test_f1_macro", "test") in linked
    for name in ("phase1-best", "phase2-best"):
        files = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{by_name[name].model_id}", dst_path=str(tmp_path / name)
            )
        )
        assert sorted(p.name for p in files.rglob("*") if p.is_file()) == [
            "model.json",
            "weights.safetensors",
        ]
    # Model files are data: no pickle and no code anywhere in the run's artifacts, and the
    # classifier comes back from the two data files.
    names = []
    for uri in (f"runs:/{run_id}/", f"runs:/{run_id}/classifier"):  # the model is a LoggedModel
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
        names += [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert "data/model/weights.safetensors" in names and "MLmodel" in names
    assert "checkpoint/weights.safetensors" in names
    assert not [n for n in names if n.endswith((".pkl", ".pth", ".pt", ".py"))], names
    assert not [n for n in names if n.startswith("model/")], "no pickled mlflow.pytorch copy"
    model = evaluate_step.load_model(f"runs:/{run_id}")
    # Calibration: the temperature fitted on validation is the served model's, and the test
    # split's ECE and Brier score are logged before and after it.
    assert model.spec.temperature == pytest.approx(metrics["calibration_temperature"])
    assert 0.05 <= metrics["calibration_temperature"] <= 20
    for key in ("test_ece", "test_ece_calibrated", "test_brier", "test_brier_calibrated"):
        assert 0 <= metrics[key] <= 2, key
    with torch.inference_mode():
        assert model.classifier(torch.zeros(3, 3, 64, 64)).shape == (3, 4)
    predictions = mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/predictions.csv")
    test_images = len(predictions.strip().splitlines()) - 1
    assert test_images == sum(
        int(data.params[k]) for k in data.params if k.startswith("data.test_")
    )


def test_same_seed_same_numbers_and_another_seed_differs(tracking_uri, tmp_path, monkeypatch):
    """Also: system metrics are on by default, off with MLflow's switch, and change nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    for seed, switch in ((5, None), (5, "false"), (6, None)):
        if switch is None:
            monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", switch)
        assert invoke(*TINY, "--seed", seed).exit_code == 0
    by_seed, system = {}, {}
    for run in sorted(runs(), key=lambda r: r.info.start_time):
        curve = [v for _, v in history(run.info.run_id, "train_loss")]
        seed = run.data.params["config.seed"]
        by_seed.setdefault(seed, []).append((curve, run.data.metrics["test_loss"]))
        system.setdefault(seed, []).append({k for k in run.data.metrics if k.startswith("system/")})
    assert by_seed["5"][0] == by_seed["5"][1]
    assert by_seed["6"][0] != by_seed["5"][0]
    assert "system/cpu_utilization_percentage" in system["5"][0]
    assert "system/system_memory_usage_megabytes" in system["5"][0]
    assert system["5"][1] == set()  # MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false


def test_processed_trains_on_the_stored_folder_with_its_identity(
    tracking_uri, tmp_path, monkeypatch
):
    """``--processed`` (what a study passes its children): the folder's own preprocessing and
    split, the same params and numbers as preprocessing with the options, no new folder."""
    monkeypatch.chdir(tmp_path)
    assert invoke(*TINY, "--kernel-size", "3").exit_code == 0
    (reference,) = runs()
    folder = Path(reference.data.tags["data.processed_dir"])
    before = sorted(p.name for p in folder.parent.iterdir())
    # By path, and by its name in the --out-dir store: the preprocessing is the folder's
    # (kernel size 3), not the config's (the default 5).
    by_path = invoke(*TINY, "--processed", folder)
    assert by_path.exit_code == 0, by_path.output
    by_name = invoke(*TINY, "--processed", folder.name, "--out-dir", folder.parent)
    assert by_name.exit_code == 0, by_name.output
    assert sorted(p.name for p in folder.parent.iterdir()) == before
    first, second = sorted(runs(), key=lambda r: r.info.start_time)[1:]
    for run in (first, second):
        identity = {
            k: v
            for k, v in run.data.params.items()
            if k.startswith(("config.", "preprocess.", "data."))
        }
        expected = {
            k: v
            for k, v in reference.data.params.items()
            if k.startswith(("config.", "preprocess.", "data."))
        }
        assert identity == expected and identity["preprocess.kernel_size"] == "3"
        assert run.data.metrics["test_loss"] == reference.data.metrics["test_loss"]
        assert run.data.tags["data.processed_dir"] == str(folder.resolve())
    # What would change the images or the split is refused, not ignored; a folder that is not
    # one is named. Neither starts a run.
    for extra, message in (
        (("--kernel-size", "9"), "fixes the preprocessing and the split; drop ['kernel_size']"),
        (("--manifest", folder / "manifest.csv"), "drop ['manifest']"),
    ):
        refused = invoke(*TINY, "--processed", folder, *extra)
        assert refused.exit_code != 0 and message in refused.output, refused.output
    missing = invoke(*TINY, "--processed", tmp_path / "nowhere")
    assert missing.exit_code != 0
    assert "is not a preprocessed folder (no params.json and manifest.csv" in missing.output
    assert len(missing.output.strip().splitlines()) == 1, missing.output
    assert len(runs()) == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bogus", "1"], "unknown config key(s) ['bogus']"),
        (["--batch_size", "0"], "batch_size must be >= 1, got 0"),
        (["--model", "efficientnet_b44"], "did you mean efficientnet_b4"),
        (["--image_size", "16"], "image_size 16 is too small"),
        (["--precision", "fp16"], "precision fp16 needs a CUDA device"),
        (["--resume", "0123456789abcdef"], "no MLflow run '0123456789abcdef'"),
        (["--phase1_epochs"], "override --phase1_epochs has no value"),
    ],
)
def test_bad_input_fails_before_any_run(tracking_uri, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    result = invoke(*TINY, *extra)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not runs()  # nothing started, so nothing left RUNNING


def test_unreadable_yaml_and_a_class_without_training_images(
    tracking_uri, tmp_path, monkeypatch, dataset_copy
):
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    result = invoke("--config", broken)
    assert result.exit_code == 1 and "is not readable YAML at line" in result.output
    # A manifest whose Pro-B training images all moved to the test split.
    from leukemia.preprocess import preprocess
    from leukemia.segmentation import SegmentationParams

    done = preprocess(dataset_copy, tmp_path / "p", seg=SegmentationParams(64), progress=False)
    lines = done.manifest.read_text().splitlines()
    moved = [ln.replace(",Pro-B,3,train,", ",Pro-B,3,test,") for ln in lines]
    assert moved != lines
    (tmp_path / "manifest.csv").write_text("\n".join(moved) + "\n")
    result = invoke(*TINY, "--data-dir", dataset_copy, "--manifest", tmp_path / "manifest.csv")
    assert result.exit_code == 1
    assert "['Pro-B'] have no training images" in result.output
    assert not runs()


def test_resume_refuses_a_finished_run_and_other_settings(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke(*TINY).exit_code == 0
    (run,) = runs()
    finished = invoke(*TINY, "--resume", run.info.run_id)
    assert finished.exit_code == 1 and "already finished" in finished.output
    MlflowClient().set_terminated(run.info.run_id, "FAILED")
    other = invoke(*TINY, "--dropout", "0.1", "--resume", run.info.run_id)
    assert other.exit_code == 1
    assert "config.dropout=0.4 (now 0.1)" in other.output
    kernel = invoke(*TINY, "--kernel-size", "9", "--resume", run.info.run_id)
    assert kernel.exit_code == 1
    assert "preprocess.kernel_size=5 (now 9)" in kernel.output
    # A damaged or lost training state: one line, no traceback.
    state = Path(os.environ["LEUKEMIA_CACHE_DIR"], "runs", run.info.run_id, "state.pt")
    state.write_bytes(state.read_bytes()[:1000])
    damaged = invoke(*TINY, "--resume", run.info.run_id)
    assert damaged.exit_code == 1 and "is damaged" in damaged.output, damaged.output
    assert "Traceback" not in damaged.output
    state.unlink()
    lost = invoke(*TINY, "--resume", run.info.run_id)
    assert lost.exit_code == 1 and "logged 2 epoch(s) but its training state" in lost.output
    # Registered once, however often registration is asked for (a resume after a kill).
    from leukemia import registry

    again = registry.register_run_model(run.info.run_id, f"runs:/{run.info.run_id}/classifier")
    versions = MlflowClient().search_model_versions("name = 'leukemia-classifier'")
    assert [v.version for v in versions] == [again.version]


def _train_process(tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "leukemia", "train", *TINY, "--phase2_epochs", "3", *extra],
        cwd=tmp_path,
        env={**os.environ, "TQDM_DISABLE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_killed_run_resumes_into_the_same_run_with_the_same_numbers(
    tracking_uri, tmp_path, monkeypatch
):
    """SIGKILL a real training process after its first epoch; resume it by run id."""
    monkeypatch.chdir(tmp_path)
    process = _train_process(tmp_path)
    states = Path(os.environ["LEUKEMIA_CACHE_DIR"], "runs")
    deadline = time.monotonic() + 120
    while not list(states.glob("*/state.pt")):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no epoch finished within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    (killed,) = runs()
    run_id = killed.info.run_id
    assert killed.info.status == "RUNNING"  # what a kill leaves behind
    state = torch.load(states / run_id / "state.pt", weights_only=True)
    assert state["global_epoch"] < 4, "the run finished before it could be killed"
    assert state["config"]["phase2_epochs"] == 3  # the state records the config it was made with

    resumed = invoke(*TINY, "--phase2_epochs", "3", "--resume", run_id)
    assert resumed.exit_code == 0, resumed.output
    assert run_id in resumed.output
    assert invoke(*TINY, "--phase2_epochs", "3").exit_code == 0  # uninterrupted reference
    by_id = {r.info.run_id: r for r in runs()}
    (reference,) = [r for i, r in by_id.items() if i != run_id]
    finished = by_id[run_id]
    assert finished.info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_accuracy"):
        logged = history(run_id, key)
        assert [s for s, _ in logged] == [1, 2, 3, 4], key  # each epoch logged exactly once
        assert logged == history(reference.info.run_id, key), key
    for key in ("test_loss", "test_accuracy", "phase1_test_f1_macro", "phase2_best_epoch"):
        assert finished.data.metrics[key] == reference.data.metrics[key], key
    model = evaluate_step.load_model(f"runs:/{run_id}").classifier
    same = evaluate_step.load_model(f"runs:/{reference.info.run_id}").classifier
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype("float32"))
    with torch.inference_mode():
        assert torch.equal(model(x), same(x))


@pytest.mark.slow
def test_mlflow_run_train_entry_point_takes_config_overrides(tmp_path):
    """``mlflow run . -e train`` with undeclared ``-P`` config overrides, as the README shows."""
    env = mlflow_run_env(tmp_path)
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train"]
    command += ["--env-manager", "local", "--experiment-name", "entry"]
    for parameter in (
        "config=experiments/demo.yaml",
        "synthetic_per_class=8",
        "segment=false",
        f"out_dir={tmp_path / 'processed'}",
        "phase1_epochs=1",
        "phase2_epochs=1",
        "phase1_lr=2e-3",
    ):
        command += ["-P", parameter]
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        (run,) = runs("entry")
    finally:
        mlflow.set_tracking_uri(None)
    assert run.info.status == "FINISHED" and run.data.tags["arm"] == "baseline"
    assert run.data.params["phase1_lr"] == "2e-3"  # as mlflow run logged it
    assert float(run.data.params["config.phase1_lr"]) == 2e-3
    assert run.data.params["config.model"] == "test_efficientnet"
    assert "test_f1_macro" in run.data.metrics


def test_system_metrics_without_psutil_are_one_line_and_the_run_goes_on(tmp_path):
    # An environment made before psutil was a dependency (MLflow reuses a project's virtualenv
    # by the hash of python_env.yaml, which names only "."): training must not fail for it.
    code = (
        "import sys; sys.modules['psutil'] = None\n"
        "import mlflow\n"
        "from leukemia import tracking\n"
        f"mlflow.set_tracking_uri('sqlite:///{tmp_path / 'm.db'}')\n"
        "with mlflow.start_run() as run:\n"
        "    with tracking.system_metrics(run.info.run_id):\n"
        "        print('trained')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "trained", done.stderr[-2000:]
    assert "system metrics not recorded: " in done.stderr
