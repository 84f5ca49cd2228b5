"""The ``search`` step: an Optuna study over preprocessing and training settings, chosen on the
validation split only, tracked in MLflow.

- One parent run per study: its id is the study's user attribute ``mlflow_parent_run_id``, so a
  second worker, or a re-run, attaches to the same parent. Under ``mlflow run -e search`` the
  entry point's run is that parent when it creates the study.
- One child run per trial (``mlflow.parentRunId``), made with ``MlflowClient.create_run`` so
  that ``MLFLOW_RUN_ID`` never swallows it: the trial number, its params, per-epoch curves and
  its value. The trial keeps the child's id (user attribute ``mlflow_run_id``). A pruned trial
  ends PRUNED in Optuna and KILLED in MLflow, a failed one FAIL and FAILED; neither stops the
  study, and no run is left RUNNING.
- The report (at the end, or ``leukemia search --report``): on the parent, metric
  ``best_value``, tags ``best.<dimension>``, ``trials.csv``, ``optimization_history.png``,
  ``param_importances.png`` (from two finished trials), ``parallel_coordinate.png`` and
  ``best.yaml``, an experiments config that ``train --config best.yaml`` runs as it is (also
  written to ``searches/<study>/best.yaml``).

The test split is never read: trials train with ``evaluate_test=False``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import optuna
import yaml
from mlflow.tracking import MlflowClient

from .. import processes, tracking, ui
from .. import record as rec
from .. import search as search_lib
from .. import train as training
from ..config import load_experiment, resolve_config_path
from ..model import PretrainedWeightsError
from . import preprocess as preprocess_step

PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
RESULTS_DIR = "searches"


class StopSearch(Exception):
    """An error every trial would meet again (weights offline, tracking server down): the
    search stops instead of failing trial after trial (Optuna catches ValueError and
    RuntimeError per trial)."""


def parent_run(
    study: optuna.Study,
    storage,
    experiment: str | None,
    echo,
    created: bool = True,
    wait_s: float = 60,
) -> str:
    """The study's MLflow parent run. The worker that created the study makes it; the others
    wait for it to be recorded (and make it themselves if its maker died before it could)."""
    deadline = time.monotonic() + (0 if created else wait_s)
    while True:
        seen = optuna.load_study(study_name=study.study_name, storage=storage)
        recorded = seen.user_attrs.get(PARENT_ATTR)
        if recorded or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if recorded:
        return recorded
    client = MlflowClient()
    launched = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run -e search` made one already
    if launched:
        run_id = launched
    else:
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or tracking.DEFAULT_EXPERIMENT
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else client.create_experiment(name)
        run_id = client.create_run(experiment_id).info.run_id
    experiment_id = client.get_run(run_id).info.experiment_id
    ui.mark_experiment(experiment_id)
    # No process tag: the parent outlives the worker that made it; the last worker out ends it.
    client.set_tag(run_id, rec.STEP, rec.SEARCH)
    client.set_tag(run_id, "search.study", study.study_name)
    client.set_tag(run_id, ui.RUN_NAME_TAG, f"search {study.study_name}")
    study.set_user_attr(PARENT_ATTR, run_id)
    echo(f"study {study.study_name}: parent run {run_id}")
    return run_id


class Objective:
    """One trial: preprocess (cached), train on train, score on validation, tracked."""

    def __init__(
        self, space, data_dir, out_dir, parent_id, workers, work_root, echo, sampler_seed=None
    ):
        self.sampler_seed = space.sampler_seed if sampler_seed is None else sampler_seed
        self.space, self.data_dir, self.out_dir = space, data_dir, out_dir
        self.parent_id, self.workers, self.work_root = parent_id, workers, work_root
        self.echo = echo

    def value(self, record: dict) -> float:
        if self.space.objective == "loss":
            return float(record["val_loss"])
        return search_lib.macro_f1(record["val_confusion"])

    def __call__(self, trial: optuna.Trial) -> float:
        train_overrides, preprocess_overrides = self.space.suggest(trial)
        config, pre = load_experiment(
            resolve_config_path(self.space.base), {**train_overrides, **preprocess_overrides}
        )
        client = MlflowClient()
        tags = {
            rec.STEP: rec.SEARCH_TRIAL,
            "search.trial": str(trial.number),
            # The worker's sampler seed: distinct per worker (search.worker_seed).
            "search.sampler_seed": str(self.sampler_seed),
        }
        trial.set_user_attr(search_lib.PROCESS_ATTR, processes.token())
        trial.set_user_attr(search_lib.SEED_ATTR, self.sampler_seed)
        run_id = tracking.create_child_run(self.parent_id, f"trial {trial.number}", tags)
        trial.set_user_attr(RUN_ATTR, run_id)
        status = "FAILED"
        try:
            with mlflow.start_run(run_id=run_id):
                mlflow.log_params({f"trial.{k}": v for k, v in trial.params.items()})
                mlflow.log_params({f"{rec.CONFIG}{k}": v for k, v in config.to_dict().items()})
                value = self._train(trial, config, pre, run_id)
                mlflow.log_metric(f"value_{self.space.objective}", value)
            status = "FINISHED"
            return value
        except optuna.TrialPruned:
            status = "KILLED"
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except (PretrainedWeightsError, tracking.TrackingUnavailable) as error:
            raise StopSearch(str(error)) from None
        finally:
            client.set_tag(run_id, "search.status", status)
            client.set_terminated(run_id, status)
            # A trial's training state is of no use after it (trials are not resumed).
            shutil.rmtree(Path(self.work_root) / run_id, ignore_errors=True)

    def _train(self, trial, config, pre, run_id) -> float:
        result, _ = preprocess_step.run(self.data_dir, self.out_dir, None, pre, self.workers)
        mlflow.set_tag(rec.PROCESSED_DIR, str(Path(result.out_dir).resolve()))
        # The schema train runs log: the preprocessing the model sees, as resolved.
        mlflow.log_params(tracking.preprocess_params(result.params["segmentation"]))
        values: dict[int, float] = {}

        def on_epoch(record):
            tracking.log_epoch(record)
            values[record["epoch"]] = self.value(record)
            mlflow.log_metric(
                f"val_{self.space.objective}", values[record["epoch"]], step=record["epoch"]
            )
            trial.report(values[record["epoch"]], step=record["epoch"])
            if trial.should_prune():
                self.echo(f"trial {trial.number}: pruned after epoch {record['epoch']}")
                raise optuna.TrialPruned()

        with tracking.system_metrics(run_id):
            outcome = training.train(
                config,
                result.out_dir,
                Path(self.work_root) / run_id,
                on_epoch=on_epoch,
                evaluate_test=False,
            )
        # The model kept is the last phase's best-validation-loss epoch: its value counts.
        phase = training.phases(config)[-1].name
        best = outcome["summary"][f"{phase}_best_epoch"]
        self.echo(f"trial {trial.number}: {self.space.objective} {values[best]:.4f}")
        return values[best]


def run(
    space,
    data_dir,
    *,
    storage: str,
    study_name: str,
    n_trials: int,
    max_trials: int | None,
    timeout: float | None,
    out_dir,
    experiment: str | None = None,
    workers: int = 0,
    echo=print,
) -> optuna.Study:
    """Run (or join) the study; returns it after the report is logged."""
    storage_object = search_lib.open_storage(
        storage, warn=echo, on_stale=lambda trial: end_lost_run(trial, echo)
    )
    study, created = search_lib.create_or_load(
        storage_object, study_name, space, worker=processes.token()
    )
    _sweep(study, echo)
    parent_id = parent_run(study, storage_object, experiment, echo, created=created)
    objective = Objective(
        space,
        data_dir,
        out_dir,
        parent_id,
        workers,
        preprocess_step.cache_dir() / "runs",
        echo,
        sampler_seed=study.sampler_seed,
    )
    callbacks = []
    if max_trials:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        callbacks.append(optuna.study.MaxTrialsCallback(max_trials, states=states))
        if _counted(study) >= max_trials:
            echo(f"study {study_name} already has {max_trials} trials: nothing to run")
            n_trials = 0
    outcome = "FINISHED"
    try:
        if n_trials:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study.optimize(
                objective,
                n_trials=n_trials,
                timeout=timeout,
                callbacks=callbacks,
                catch=(ValueError, RuntimeError),
            )
        report(study, space, echo=echo)
    except KeyboardInterrupt:
        outcome = "KILLED"
        raise
    except BaseException as error:
        outcome = "FAILED"
        why = search_lib.storage_unreachable(error)
        if why:
            raise StopSearch(
                f"Optuna storage {search_lib.redacted(storage)} is unreachable ({why}); this "
                "worker's trial run ended FAILED, and the trial, left RUNNING there, is failed "
                "and retried by the next worker once the storage is back: run the search again "
                "then"
            ) from None
        raise
    finally:
        end_parent_if_idle(study, outcome, parent_id)
    return study


def end_parent_if_idle(
    study: optuna.Study, outcome: str = "FINISHED", parent_id: str | None = None
) -> None:
    """The last worker out ends the parent (mlflow run ends its own): while a worker is still
    in a trial, the parent stays RUNNING. A storage that cannot be reached cannot say, so the
    parent is ended rather than left RUNNING for good."""
    try:
        parent_id = parent_id or study.user_attrs.get(PARENT_ATTR)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    except Exception as error:  # noqa: BLE001 - only the storage being away is handled
        if not (parent_id and search_lib.storage_unreachable(error)):
            raise
        running = []
    if not parent_id or running or parent_id == os.environ.get("MLFLOW_RUN_ID"):
        return
    client = MlflowClient()
    if client.get_run(parent_id).info.status == "RUNNING":
        client.set_terminated(parent_id, outcome)


def end_lost_run(trial: optuna.trial.FrozenTrial, echo=print) -> None:
    """A trial the storage's heartbeat failed (its worker died, on whichever machine): end its
    MLflow run KILLED now, where the same-host sweep could not reach it."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    echo(
        f"trial {trial.number} lost its worker (no heartbeat): marked FAIL (a first failure is "
        "queued again as a new trial)"
    )
    if not run_id:
        return
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return
        client.set_tag(
            run_id,
            tracking.KILLED_TAG,
            f"its worker stopped sending heartbeats; trial {trial.number} failed (a first "
            "failure is retried as a new trial)",
        )
        client.set_tag(run_id, "search.status", "KILLED")
        client.set_terminated(run_id, "KILLED")
    except Exception as error:  # noqa: BLE001 - inside Optuna's callback: never stop a worker
        # (the run deleted, the server away, ...); the same-host sweep may still end it.
        echo(f"could not end run {run_id} of trial {trial.number}: {error}")


def _sweep(study, echo) -> None:
    """End what a killed worker left running: its Optuna trial (FAIL) and its MLflow run."""
    failed = search_lib.fail_stale_trials(study)
    if failed:
        echo(f"trials {failed} of study {study.study_name} lost their worker: marked FAIL")
    tracking.open_store()


def _counted(study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def best_config(space, best_params: dict) -> dict:
    """A complete experiments config: the base's every field, with the best values in."""
    train_overrides, preprocess_overrides = space.split(best_params)
    config, pre = load_experiment(
        resolve_config_path(space.base), {**train_overrides, **preprocess_overrides}
    )
    return {**config.to_dict(), "preprocess": pre.to_dict()}


def report(study: optuna.Study, space, echo=print) -> dict | None:
    """Log the study's results to its parent run (see the module); returns the best config."""
    _sweep(study, echo)
    parent_id = study.user_attrs.get(PARENT_ATTR)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    client = MlflowClient()
    counts = {
        state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
        for state in optuna.trial.TrialState
    }
    echo("trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    if parent_id is None or not complete:
        echo("no finished trial yet: nothing to report")
        return None
    best = study.best_trial
    config = best_config(space, best.params)
    client.log_metric(parent_id, "best_value", best.value, step=len(study.trials))
    for name, value in best.params.items():
        client.set_tag(parent_id, f"best.{name}", str(value))
    client.set_tag(parent_id, "best.trial", str(best.number))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        text = (
            f"# Best of study {study.study_name}: trial {best.number}, validation "
            f"{space.objective} {best.value:.4f}. A complete experiments config:\n"
            f"# leukemia train --config best.yaml (test it with compare before reporting).\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
        (folder / "best.yaml").write_text(text)
        for name, figure in _figures(study):
            figure.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
        client.log_artifacts(parent_id, str(folder))
    local = Path(RESULTS_DIR, search_lib.check_study_name(study.study_name))
    local.mkdir(parents=True, exist_ok=True)
    partial = local / f".best.yaml.{os.getpid()}"
    partial.write_text(text)
    partial.replace(local / "best.yaml")  # atomically: a reader never sees half a file
    ui.describe(
        parent_id,
        f"**Search {study.study_name}**: best validation {space.objective} {best.value:.4f} "
        f"(trial {best.number} of {len(study.trials)}): "
        + ", ".join(f"`{k}` = {v}" for k, v in best.params.items())
        + f". The config: `best.yaml` (also {local / 'best.yaml'}).",
    )
    echo(
        f"best: trial {best.number}, validation {space.objective} {best.value:.4f}, "
        f"{best.params}\nconfig: {local / 'best.yaml'} (train --config {local / 'best.yaml'})"
    )
    return config


def _figures(study):
    """Optuna's matplotlib figures that apply to this study's trials."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    makers = [("optimization_history", plots.plot_optimization_history)]
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) >= 2 and len({t.value for t in complete}) > 1:
        makers.append(("param_importances", plots.plot_param_importances))
    makers.append(("parallel_coordinate", plots.plot_parallel_coordinate))
    figures = []
    for name, make in makers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's matplotlib backend is experimental
            try:
                axes = make(study)
            except (ValueError, RuntimeError):
                continue  # not enough variety among the trials for this figure
        figures.append((name, axes.figure if hasattr(axes, "figure") else axes[0].figure))
    return figures
