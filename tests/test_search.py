"""``leukemia search``: the space's checks, a tracked study on real Optuna and MLflow stores,
pruned and failed trials, several workers on one journal, the test split never read."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from leukemia import search as search_lib
from leukemia.cli import main
from leukemia.config import load_experiment
from leukemia.steps import search as search_step

from .conftest import REPO

SHORT = ["--synthetic-per-class", "8", "--phase1_epochs", "1", "--phase2_epochs", "2"]


def write_space(path: Path, space: dict, **top) -> Path:
    body = {"base": str(REPO / "experiments" / "demo.yaml"), **top, "space": space}
    path.write_text(yaml.safe_dump(body))
    return path


def invoke(*args):
    return CliRunner().invoke(main, ["search", *map(str, args)], catch_exceptions=False)


@pytest.fixture(autouse=True)
def optuna_warnings_fail():
    """The current Optuna API only: its deprecation warnings are errors here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("error", category=DeprecationWarning, module="optuna")
        yield


@pytest.mark.parametrize(
    "space, message",
    [
        ({}, "empty search space"),
        ({"dropout": False}, "every dimension"),
        ({"kernel_size": {"low": 9, "high": 3}}, "low 9 is above high 3"),
        ({"kernel_size": {"low": 4, "high": 9}}, "kernel_size bounds must be odd"),
        ({"kernel_size": {"low": 1, "high": 9}}, "must lie in [3, 15]"),
        ({"colour": [1, 2]}, "unknown search dimension 'colour'; valid ones: kernel_size"),
        ({"channel": ["gray", "blue"]}, "choices ['blue'] are not among"),
        ({"phase2_lr": {"low": 0, "high": 1e-2, "log": True}}, "must lie in"),
        # Issue 23, item 11: these passed the checks (NaN compares false) or were tracebacks.
        ({"phase2_lr": {"low": float("nan"), "high": 1e-2}}, "bounds must be finite numbers"),
        ({"phase2_lr": {"low": 1e-3, "high": 1e-2, "log": "no"}}, "log must be true or false"),
        ({"objective": ["f1_macro"]}, "objective must be one of"),
        ({"sampler_seed": [1, 2]}, "sampler_seed in"),
        ({"sampler_seed": "abc"}, "must be a whole number >= 0, got 'abc'"),
    ],
)
def test_a_bad_space_is_one_line_before_any_trial(tmp_path, tracking_uri, space, message):
    top = {k: space.pop(k) for k in ("objective", "sampler_seed") if k in space}
    if top:
        space["phase2_lr"] = {"low": 1e-3, "high": 1e-2}
    path = write_space(tmp_path / "space.yaml", space, **top)
    result = invoke("--space", path, "--storage", tmp_path / "j.log", *SHORT)
    assert result.exit_code == 1 and message in result.output, result.output
    assert result.output.count("\n") == 1
    store = tmp_path / "mlflow.db"  # the tracking_uri fixture's: never created is cheapest
    assert not store.exists() or not mlflow.search_runs(
        search_all_experiments=True, output_format="list"
    )


def test_bad_storage_and_a_study_name_taken_by_another_space(tmp_path, tracking_uri):
    path = write_space(tmp_path / "a.yaml", {"phase2_lr": {"low": 1e-3, "high": 1e-2}})
    result = invoke("--space", path, "--storage", "postgresql://nobody@127.0.0.1:9/none")
    assert result.exit_code == 1 and "cannot open Optuna storage" in result.output
    assert invoke("--space", path, "--n-trials", "0").exit_code == 2  # click: n_trials >= 1
    typo = invoke("--space", path, "--storage", tmp_path / "j.log", "--phase1_epoch", "2")
    assert typo.exit_code == 1 and "unknown config key(s) ['phase1_epoch']" in typo.output
    missing = invoke("--space", path, "--storage", tmp_path / "j.log", "--report")
    assert missing.exit_code == 1 and "no study 'a'" in missing.output
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")
    storage = search_lib.open_storage(str(tmp_path / "j.log"))
    study, created = search_lib.create_or_load(storage, "taken", search_lib.load_space(path))
    again, created_again = search_lib.create_or_load(storage, "taken", search_lib.load_space(path))
    assert created and not created_again and again.study_name == study.study_name
    other = write_space(tmp_path / "b.yaml", {"dropout": {"low": 0.1, "high": 0.5}})
    result = invoke("--space", other, "--storage", tmp_path / "j.log", "--study-name", "taken")
    assert result.exit_code == 1 and "exists with another search space" in result.output


def test_a_study_is_tracked_and_its_best_config_trains(tmp_path, tracking_uri, monkeypatch):
    """Three trials on a journal: one parent, a child run per trial, the report, best.yaml;
    the test images are garbage and nothing reads them."""
    monkeypatch.chdir(tmp_path)
    preprocessed = CliRunner().invoke(
        main, ["preprocess", "--synthetic-per-class", "8", "--json"], catch_exceptions=False
    )
    folder = Path(yaml.safe_load(preprocessed.output.splitlines()[-1])["out_dir"])
    for png in folder.rglob("*.png"):
        if png.name != "preview.png" and _split_of(folder, png) == "test":
            png.write_bytes(b"not a png: a search must never read the test split")
    space = write_space(
        tmp_path / "s.yaml", {"phase2_lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    )
    result = invoke("--space", space, "--n-trials", "3", "--storage", tmp_path / "j.log", *SHORT)
    assert result.exit_code == 0, result.output
    assert "trials: 3 complete" in result.output

    storage = search_lib.open_storage(str(tmp_path / "j.log"))
    study = optuna.load_study(study_name="s", storage=storage)
    parent_id = study.user_attrs[search_step.PARENT_ATTR]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.info.run_name for r in children) == ["trial 0", "trial 1", "trial 2"]
    assert {t.user_attrs[search_step.RUN_ATTR] for t in study.trials} == {
        r.info.run_id for r in children
    }
    assert all(r.info.status == "FINISHED" for r in runs)  # the parent too: nothing RUNNING
    for child in children:
        assert "trial.phase2_lr" in child.data.params
        assert [m.step for m in MlflowClient().get_metric_history(child.info.run_id, "val_loss")]
        assert not [k for k in child.data.metrics if k.startswith("test")]
    parent = MlflowClient().get_run(parent_id)
    assert parent.data.metrics["best_value"] == study.best_value
    names = {a.path for a in MlflowClient().list_artifacts(parent_id)}
    assert {"trials.csv", "best.yaml", "optimization_history.png"} <= names
    best = tmp_path / "searches" / "s" / "best.yaml"
    config, _ = load_experiment(best)
    assert config.phase2_lr == pytest.approx(study.best_params["phase2_lr"])
    assert config.phase1_epochs == 1  # the fixed --phase1_epochs override is in it too
    assert not list((Path(os.environ["LEUKEMIA_CACHE_DIR"]) / "runs").glob("*"))  # no states

    # A second run of the same command continues the study; --max-trials caps it.
    again = invoke(
        "--space",
        space,
        "--n-trials",
        3,
        "--max-trials",
        4,
        "--storage",
        tmp_path / "j.log",
        *SHORT,
    )
    assert again.exit_code == 0, again.output
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 4


def _split_of(folder: Path, png: Path) -> str:
    import csv

    with (folder / "manifest.csv").open() as handle:
        splits = {row["processed"]: row["split"] for row in csv.DictReader(handle)}
    return splits.get(png.relative_to(folder).as_posix(), "")


def test_pruned_trials_end_killed_and_failed_ones_failed(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = search_lib.load_space(
        write_space(tmp_path / "s.yaml", {"dropout": {"low": 0.1, "high": 0.5}})
    )
    space = search_lib.SearchSpace(**{**space.__dict__, "overrides": (("phase1_epochs", 1),)})
    storage = search_lib.open_storage(str(tmp_path / "j.log"))
    # Macro F1 is never above 2: a threshold pruner prunes every trial at its first report.
    study = optuna.create_study(
        storage=storage,
        study_name="p",
        direction="maximize",
        pruner=optuna.pruners.ThresholdPruner(lower=2.0),
    )
    parent = search_step.parent_run(study, storage, "search", print)
    from leukemia.steps import preprocess as preprocess_step

    data = preprocess_step.resolve_data_dir("synthetic", 8, 0)
    objective = search_step.Objective(space, data, tmp_path / "p", parent, 0, tmp_path / "w", print)
    study.optimize(objective, n_trials=1)
    broken = search_lib.SearchSpace(**{**space.__dict__, "overrides": (("model", "no_such_net"),)})
    failing = search_step.Objective(broken, data, tmp_path / "p", parent, 0, tmp_path / "w", print)
    study.optimize(failing, n_trials=1, catch=(ValueError,))  # the study goes on
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL]
    statuses = [
        MlflowClient().get_run(t.user_attrs[search_step.RUN_ATTR]).info.status for t in study.trials
    ]
    assert statuses == ["KILLED", "FAILED"]


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    """`--jobs 2`: two processes on one journal file at once: one study, unique trial numbers,
    one parent, one child run per trial, nothing left RUNNING."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "LEUKEMIA_CACHE_DIR": str(tmp_path / "cache"),
    }
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    space = write_space(tmp_path / "s.yaml", {"phase2_lr": {"low": 1e-3, "high": 1e-2}})
    command = [
        sys.executable,
        "-m",
        "leukemia",
        "search",
        "--space",
        str(space),
        "--n-trials",
        "3",
        "--storage",
        str(tmp_path / "j.log"),
        "--study-name",
        "shared",
        "--jobs",
        "2",
        *SHORT,
    ]
    launched = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "2 search worker(s) on local" in launched.stdout
    study = optuna.load_study(
        study_name="shared", storage=search_lib.open_storage(str(tmp_path / "j.log"))
    )
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3, 4, 5]
    # Issue 20: each worker samples with its own seed (the creator's is the space's, 0), so
    # no two trials share parameters (with one shared seed they came in identical pairs).
    assert len({t.params["phase2_lr"] for t in study.trials}) == 6
    seeds = [t.user_attrs[search_lib.SEED_ATTR] for t in study.trials]
    assert sorted(set(seeds))[0] == 0 and len(set(seeds)) == 2
    assert sorted(seeds.count(s) for s in set(seeds)) == [3, 3]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    parents = [r for r in runs if r.data.tags.get("step") == "search"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 6 and all(r.info.status != "RUNNING" for r in runs)
    assert {r.data.tags["search.sampler_seed"] for r in children} == {str(s) for s in seeds}


@pytest.mark.slow
def test_mlflow_run_search_keeps_its_trials_apart(tmp_path):
    """Under `mlflow run -e search`, MLFLOW_RUN_ID names the entry point's run: it becomes the
    study's parent, and every trial is a child run of its own, not that run."""
    import shutil

    from .conftest import mlflow_run_env
    from .test_user_paths import COPY_IGNORE

    project = tmp_path / "project"
    shutil.copytree(REPO, project, ignore=COPY_IGNORE)
    env = mlflow_run_env(tmp_path)
    command = [
        "mlflow", "run", ".", "-e", "search", "--env-manager", "local",
        "-P", "n_trials=2", "-P", "synthetic_per_class=8",
        "-P", "phase1_epochs=1", "-P", "phase2_epochs=2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    (parent,) = [r for r in runs if r.data.tags.get("step") == "search"]
    assert parent.data.tags["mlflow.project.entryPoint"] == "search"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["trial 0", "trial 1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert (project / "searches" / "search-demo" / "best.yaml").is_file()


@pytest.mark.slow
def test_confirm_seeds_pair_the_base_and_the_best_on_test(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    space = write_space(tmp_path / "s.yaml", {"phase2_lr": {"low": 1e-3, "high": 1e-2}})
    result = invoke(
        "--space", space, "--n-trials", 1, "--storage", tmp_path / "j.log",
        "--confirm-seeds", "1", *SHORT,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "seed 1: best - base test accuracy" in result.output
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("step") == "search"]
    (confirm,) = [r for r in runs if r.data.tags.get("step") == "search-confirm"]
    assert confirm.data.tags["mlflow.parentRunId"] == parent.info.run_id
    trained = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == confirm.info.run_id]
    assert sorted(r.data.params["seed"] for r in trained) == ["1", "1"]
    # Each child trained on the folder confirm built for its config, passed by name.
    assert "confirm base images:" in result.output and "confirm best images:" in result.output
    for run in trained:
        assert Path(run.data.tags["data.processed_dir"]).name == run.data.params["processed"]
    assert all(r.info.status == "FINISHED" for r in runs)
    saved = mlflow.artifacts.load_dict(f"runs:/{confirm.info.run_id}/confirm.json")
    assert set(saved["per_seed"]) == {"1"} and set(saved["table"]) == {"base", "best"}
    assert saved["configs"]["best"].endswith("searches/s/best.yaml")
    assert "best_minus_base_accuracy_seed1" in confirm.data.metrics


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_nothing_running(tmp_path):
    """SIGKILL one of two workers inside a trial: the other finishes its trials, the study
    still loads, and the next command ends the dead worker's trial (FAIL) and run (KILLED)."""
    import signal
    import time

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "LEUKEMIA_CACHE_DIR": str(tmp_path / "cache"),
    }
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    subprocess.run(
        [sys.executable, "-c", "import mlflow; mlflow.search_experiments()"], env=env, check=True
    )
    space = write_space(tmp_path / "s.yaml", {"phase2_lr": {"low": 1e-3, "high": 1e-2}})
    journal = tmp_path / "j.log"
    command = [
        sys.executable, "-m", "leukemia", "search", "--space", str(space), "--n-trials", "2",
        "--storage", str(journal), "--study-name", "k", "--synthetic-per-class", "8",
        "--phase1_epochs", "1", "--phase2_epochs", "15", "--patience", "0",
    ]  # fmt: skip
    victim = subprocess.Popen(command, cwd=tmp_path, env=env)
    survivor = subprocess.Popen(command, cwd=tmp_path, env=env)
    storage = search_lib.open_storage(str(journal))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until the victim is inside its first trial
        try:
            running = optuna.load_study(study_name="k", storage=storage).get_trials(
                states=(optuna.trial.TrialState.RUNNING,)
            )
        except KeyError:  # no study yet
            running = []
        if any(f":{victim.pid}:" in t.user_attrs.get("process", "") for t in running):
            break
        time.sleep(0.2)
    time.sleep(2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert survivor.wait(timeout=600) == 0  # the other worker finishes its trials
    # The next command sweeps what the dead worker left running.
    report = subprocess.run([*command, "--report"], cwd=tmp_path, env=env, timeout=300)
    assert report.returncode == 0
    study = optuna.load_study(study_name="k", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1, states
    (lost,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert f":{victim.pid}:" in lost.user_attrs["process"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert sorted(r.info.status for r in runs if r.data.tags.get("step") == "search-trial") == [
        "FINISHED",
        "FINISHED",
        "KILLED",
    ]


def test_macro_f1_from_a_confusion_matrix_matches_scikit_learn():
    import numpy as np
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    labels, predicted = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    predicted[labels == 3] = 0  # class 3 never predicted: its F1 is 0
    confusion = np.zeros((4, 4), int)
    np.add.at(confusion, (labels, predicted), 1)
    expected = f1_score(labels, predicted, average="macro", zero_division=0)
    assert search_lib.macro_f1(confusion.tolist()) == pytest.approx(expected)


def test_sqlite_storage_is_for_one_worker_and_says_so(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path / "s.yaml", {"dropout": {"low": 0.1, "high": 0.5}})
    result = invoke(
        "--space", space, "--n-trials", 1, "--storage", f"sqlite:///{tmp_path / 'o.db'}",
        "--objective", "loss", *SHORT,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "SQLite storage is for one worker" in result.output
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    (run,) = [
        r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
        if r.data.tags.get("step") == "search-trial"
    ]
    assert run.data.metrics["value_loss"] == pytest.approx(study.best_value)


@pytest.mark.parametrize(
    "url, shown",
    [
        (
            "postgresql+psycopg2://u:secret@db:5432/optuna",
            "postgresql+psycopg2://u:***@db:5432/optuna",
        ),
        ("postgresql://u:p@ss@db/optuna", "postgresql://u:***@db/optuna"),  # '@' in the password
        ("postgresql://u:a/b:c@db/optuna", "postgresql://u:***@db/optuna"),  # '/' and ':' too
        ("postgresql://u:s3cr3t@[::1/optuna", "postgresql://u:***@[::1/optuna"),  # malformed
        ("postgresql://u@db/optuna", "postgresql://u@db/optuna"),  # no password: unchanged
        ("postgresql://u:p?ss@db/optuna", "postgresql://u:***@db/optuna"),  # '?' in the password
        ("postgresql://u@db/optuna?password=pw", "postgresql://u@db/optuna?password=***"),
        (
            "postgresql://db/optuna?sslmode=require&Password=pw&user=u",
            "postgresql://db/optuna?sslmode=require&Password=***&user=u",
        ),
        ("searches/optuna.journal", "searches/optuna.journal"),
    ],
)
def test_storage_urls_are_shown_without_their_password(url, shown):
    assert search_lib.redacted(url) == shown
    assert search_lib.holds_password(url) == (url != shown)


def test_a_password_in_the_storage_url_is_refused_under_mlflow_run():
    """Issue 23, item 10: `mlflow run -P storage=...` prints and logs the URL as a param."""
    url = "postgresql+psycopg2://u:secret@db/optuna"
    search_lib.check_storage_secret(url, under_mlflow_run=False)  # masked, not refused
    search_lib.check_storage_secret("postgresql://u@db/o", under_mlflow_run=True)
    with pytest.raises(ValueError, match="PGPASSWORD or ~/.pgpass") as error:
        search_lib.check_storage_secret(url, under_mlflow_run=True)
    assert "secret" not in str(error.value) and "u:***@db" in str(error.value)


def test_the_tracking_uri_is_shown_without_its_password(monkeypatch):
    """Issue 23, item 10: messages, printed links and reports show the tracking URI too."""
    import mlflow
    from click.testing import CliRunner

    from leukemia import ui
    from leukemia.cli import main

    uri = "http://u:secret@127.0.0.1:9"  # nothing listens on port 9
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(uri)
    try:
        result = CliRunner().invoke(main, ["models"])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert "tracking server http://u:***@127.0.0.1:9 is unreachable" in result.output
        assert "secret" not in result.output
        assert "secret" not in ui.run_url("1", "abc")
    finally:
        mlflow.set_tracking_uri(None)
