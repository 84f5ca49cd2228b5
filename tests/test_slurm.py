"""A study's train runs as Slurm jobs (submitit) on a real single-node cluster: the same runs
and metrics as on this machine; a cancelled job and a killed parent leave nothing running or
queued; search workers as jobs on one study (issue 20)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from leukemia import record as rec
from leukemia import slurm

from .conftest import REPO, mlflow_run_env
from .slurm_cluster import queue, single_node_cluster

TINY = [
    "--config",
    str(REPO / "experiments" / "demo.yaml"),
    "--synthetic-per-class",
    "8",
    "--shortcuts",
    "false",
    "--seeds",
    "1",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with single_node_cluster(tmp_path_factory.mktemp("slurm")) as conf:
        yield conf


def _compare(tmp_path, experiment, *extra, **popen):
    command = [sys.executable, "-m", "leukemia", "compare", *TINY, "--experiment", experiment]
    return subprocess.Popen(
        [*command, *extra],
        cwd=tmp_path,
        env=mlflow_run_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _children(experiment: str) -> list:
    return [
        r
        for r in mlflow.search_runs(
            experiment_names=[experiment], filter_string="tags.step = 'train'", output_format="list"
        )
    ]


@pytest.mark.slow
def test_a_study_on_slurm_matches_the_same_study_run_here(cluster, tmp_path):
    # The demo study, 2 arms x 2 seeds: two children at a time in both places (local slots
    # here, one CPU per array task there), as tiny children are mostly start-up.
    study = ("--phase2_epochs", "1", "--arms", "baseline,proposed", "--seeds", "1,2")
    local = _compare(tmp_path, "local", *study, "--jobs", "2")
    out, _ = local.communicate(timeout=600)
    assert local.returncode == 0, out
    assert "4 train runs (mlflow run -e train) on local" in out
    on_slurm = _compare(tmp_path, "slurm", *study, "--executor", "slurm", "--slurm-cpus", "1")
    out, _ = on_slurm.communicate(timeout=600)
    assert on_slurm.returncode == 0, out
    mlflow.set_tracking_uri(mlflow_run_env(tmp_path)["MLFLOW_TRACKING_URI"])
    runs = {e: _children(e) for e in ("local", "slurm")}
    key = lambda r: (r.data.tags["arm"], r.data.params["config.seed"])  # noqa: E731
    by_child = {e: {key(r): r for r in found} for e, found in runs.items()}
    expected = {(arm, seed) for arm in ("baseline", "proposed") for seed in ("1", "2")}
    assert set(by_child["local"]) == set(by_child["slurm"]) == expected
    assert len(runs["slurm"]) == 4
    for child, run in by_child["slurm"].items():
        there = by_child["local"][child].data.metrics
        for metric in ("test_accuracy", "test_f1_macro", "test_loss"):
            assert run.data.metrics[metric] == pytest.approx(there[metric], rel=1e-4), child
        assert run.info.status == "FINISHED"
        job = run.data.tags[rec.SLURM_JOB]
        assert job in out and os.path.isfile(run.data.tags[rec.SLURM_LOG])
        parent = run.data.tags["mlflow.parentRunId"]
        assert MlflowClient().get_run(parent).data.tags["step"] == "compare"
    jobs = {r.data.tags[rec.SLURM_JOB].split("_")[0] for r in runs["slurm"]}
    assert len(jobs) == 1, f"one job array, got jobs {jobs}"
    tasks = {r.data.tags[rec.SLURM_JOB] for r in runs["slurm"]}
    assert len(tasks) == 4, f"one array task per child, got {tasks}"
    assert not queue()


@pytest.mark.slow
def test_a_cancelled_job_and_a_killed_parent_leave_nothing_running(cluster, tmp_path):
    study = _compare(
        tmp_path,
        "cancel",
        "--phase1_epochs",
        "300",
        "--patience",
        "300",
        "--executor",
        "slurm",
        "--slurm-cpus",
        "1",
    )
    mlflow.set_tracking_uri(mlflow_run_env(tmp_path)["MLFLOW_TRACKING_URI"])
    try:
        deadline = time.monotonic() + 300
        training = []
        while time.monotonic() < deadline and len(training) < 2:
            assert study.poll() is None, study.stdout.read()
            time.sleep(2)
            training = [r for r in _children("cancel") if "train_loss" in r.data.metrics]
        assert len(training) == 2, "both jobs should be training"
        cancelled, other = training
        subprocess.run(["scancel", cancelled.data.tags[rec.SLURM_JOB]], check=True)
        ended = time.monotonic() + 90
        while time.monotonic() < ended:
            if MlflowClient().get_run(cancelled.info.run_id).info.status != "RUNNING":
                break
            time.sleep(1)
        assert MlflowClient().get_run(cancelled.info.run_id).info.status == "KILLED"
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(study.stdout), daemon=True)
        reader.start()
        said = time.monotonic() + 60
        while time.monotonic() < said and not any("ended CANCELLED" in x for x in lines):
            time.sleep(1)
        job = cancelled.data.tags[rec.SLURM_JOB]
        assert any(f"Slurm job {job} ended CANCELLED" in x for x in lines), "".join(lines)
        assert study.poll() is None, "the other job goes on"
        study.send_signal(signal.SIGTERM)  # kill: the parent cancels what it started
        study.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if study.poll() is None:
            study.kill()
    assert study.returncode != 0
    assert f"cancelled Slurm jobs {other.data.tags[rec.SLURM_JOB]}" in "".join(lines)
    deadline = time.monotonic() + 60
    while queue() and time.monotonic() < deadline:
        time.sleep(1)
    assert not queue(), "jobs left queued or running"
    statuses = {r.info.run_id: r.info.status for r in _children("cancel")}
    assert statuses[other.info.run_id] == "KILLED", statuses
    assert "RUNNING" not in statuses.values()
    parents = mlflow.search_runs(
        experiment_names=["cancel"], filter_string="tags.step = 'compare'", output_format="list"
    )
    assert [p.info.status for p in parents] == ["KILLED"]


def test_bad_slurm_settings_are_one_line_before_any_job(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ValueError, match="needs Slurm's sbatch on PATH"):
        slurm.check_slurm(slurm.Slurm())
    with pytest.raises(ValueError, match=r"unknown keys \['gpu'\] in the slurm block"):
        slurm.Slurm.from_block({"gpu": 1}, "x.yaml")


def test_slurm_resources_are_the_config_block_with_the_options_over_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: test_efficientnet\nslurm:\n  partition: gpu\n  cpus: 8\n")
    options = {"slurm_partition": None, "slurm_time": 30, "slurm_cpus": 4, "seeds": "1"}
    settings = slurm.Slurm.from_options(options, config)
    assert (settings.partition, settings.time_min, settings.cpus, settings.gpus) == (
        "gpu",
        30,
        4,
        0,
    )
    assert options == {"seeds": "1"}  # the --slurm-* options are taken out, the rest stay
    assert slurm.Slurm.from_options({}, None) == slurm.Slurm()
    config.write_text("slurm:\n  gpu: 1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['gpu'\] in the slurm block of '"):
        slurm.Slurm.from_options({}, config)


@pytest.mark.slow
def test_an_unknown_partition_is_named_with_the_real_ones(cluster):
    with pytest.raises(ValueError, match="unknown Slurm partition 'gpu'; this cluster has debug"):
        slurm.check_slurm(slurm.Slurm(partition="gpu"))


@pytest.mark.slow
def test_search_workers_as_slurm_jobs_share_one_study(cluster, tmp_path):
    import optuna
    import yaml

    from leukemia import search as search_lib

    space = tmp_path / "s.yaml"
    body = {"base": str(REPO / "experiments" / "demo.yaml")}
    space.write_text(yaml.safe_dump({**body, "space": {"phase2_lr": {"low": 1e-3, "high": 1e-2}}}))
    journal = tmp_path / "j.log"
    command = [sys.executable, "-m", "leukemia", "search", "--space", str(space)]
    command += ["--storage", str(journal), "--study-name", "jobs", "--n-trials", "1"]
    command += ["--synthetic-per-class", "8", "--phase1_epochs", "1", "--phase2_epochs", "1"]
    command += ["--executor", "slurm", "--jobs", "2", "--slurm-cpus", "1"]
    done = subprocess.run(
        command, cwd=tmp_path, env=mlflow_run_env(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("Slurm job") == 2
    study = optuna.load_study(study_name="jobs", storage=search_lib.open_storage(str(journal)))
    assert sorted(t.number for t in study.trials) == [0, 1]
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in finished for t in study.trials), [t.state for t in study.trials]
    assert len({t.params["phase2_lr"] for t in study.trials}) == 2
    assert "best" in done.stdout.lower()  # the launcher reports the study the jobs ran
    assert not queue()


def test_pending_array_tasks_are_known_one_by_one():
    # scontrol shows the tasks still pending as one record with a range of task ids; each is
    # queued, not gone (a 2 x 2 study on 2 CPUs failed its last two children as "GONE").
    assert slurm._array_tasks("3") == ["3"]
    assert slurm._array_tasks("2-3%2") == ["2", "3"]
    assert slurm._array_tasks("1,4-9:2") == ["1", "4", "6", "8"]
