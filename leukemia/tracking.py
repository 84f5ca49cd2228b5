"""The one library module that talks to MLflow.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else MLflow's default (``sqlite:///mlflow.db`` in
the working directory). Under ``mlflow run`` the entry point's run is reused (MLFLOW_RUN_ID).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow

from . import processes, sqlite_store, ui, urls
from . import record as rec
from .arms import arm_of

DEFAULT_EXPERIMENT = "leukemia"
PREPROCESS_ARTIFACTS = ("manifest.csv", "audit.json", "params.json", "preview.png")


@contextlib.contextmanager
def start_run(
    run_name: str,
    experiment: str | None = None,
    nested: bool = False,
    tags=None,
    run_id: str | None = None,
):
    """Start (or, under ``mlflow run``, resume) a run in ``experiment``.

    The experiment is left alone when MLflow already has one from the environment
    (``MLFLOW_EXPERIMENT_NAME``/``_ID``, or the run ``mlflow run`` created). ``run_id``
    continues that existing run instead (resume), whatever the environment says.
    """
    tags = {**(tags or {}), PROCESS_TAG: processes.token()}
    open_store()
    if run_id:
        opened = mlflow.start_run(run_id=run_id, tags=tags)
    else:
        from_environment = any(
            os.environ.get(name)
            for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
        )
        if not nested and (experiment or not from_environment):
            mlflow.set_experiment(experiment or DEFAULT_EXPERIMENT)
        opened = mlflow.start_run(run_name=run_name, nested=nested, tags=tags)
    with opened as run:
        ui.mark_experiment(run.info.experiment_id)
        if run_id and KILLED_TAG in run.data.tags:  # resumed: that reason no longer holds
            mlflow.tracking.MlflowClient().delete_tag(run_id, KILLED_TAG)
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")  # Ctrl-C, kill: not FAILED, as MLflow's exit would say
            raise
        except Exception as error:
            if unreachable(error):
                give_up_on_server()  # ending the run must not spend the budget again
            raise


SYSTEM_METRICS_SWITCH = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"  # MLflow's own variable


@contextlib.contextmanager
def system_metrics(run_id: str):
    """CPU, memory, disk and network use (and GPU utilisation and memory where one is visible:
    nvidia-ml-py) logged to ``run_id`` as MLflow's ``system/*`` metrics while the block runs,
    every 10 s (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``). MLflow's monitor, scoped to
    training: a thread alive during preprocessing would keep its workers from forking. On by
    default; ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns it off, and ``=true`` leaves
    it to MLflow, which then monitors every run itself."""
    if os.environ.get(SYSTEM_METRICS_SWITCH, "").strip().lower() in ("false", "0", "true", "1"):
        yield
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as error:  # no psutil: an environment made before it was required
        print(f"system metrics not recorded: {error}", file=sys.stderr)
        yield
        return

    monitor = SystemMetricsMonitor(run_id, resume_logging=True)  # a resumed run goes on
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def create_child_run(parent_id: str, name: str, tags: dict) -> str:
    """A RUNNING child of ``parent_id`` in the parent's experiment, named ``name``, carrying
    this process's token (so a sweep can end it if the process dies); returns its id. The one
    way this package makes a child run in process (``mlflow run`` children: ``children``)."""
    client = mlflow.tracking.MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    tags = {
        **tags,
        "mlflow.parentRunId": parent_id,
        ui.RUN_NAME_TAG: name,
        PROCESS_TAG: processes.token(),
    }
    return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id


# A bounded retry budget for a tracking server (MLflow's default retries for about four
# minutes, meant for rate limits); a variable the user set wins. urllib3 sleeps 0, 4, 8, 16 s.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used: its server did not answer within the retry budget,
    or a local SQLite store is half-created."""


class _RetryNotice(logging.Handler):
    """Says once, as soon as urllib3 starts retrying, that the server is unreachable."""

    def __init__(self, uri: str, echo):
        super().__init__(logging.WARNING)
        self.uri, self.echo, self.said = uri, echo, False

    def emit(self, record):
        if self.said or not record.getMessage().startswith("Retrying"):
            return
        self.said = True
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        self.echo(
            f"MLflow tracking server {self.uri} is unreachable; retrying ({retries} retries with "
            "backoff, about 30 s with the default MLFLOW_HTTP_REQUEST_* settings) ..."
        )


def shown_uri() -> str:
    """The tracking URI as messages, links and reports show it: any password hidden."""
    return urls.redacted(mlflow.get_tracking_uri())


def watch_tracking_server(echo) -> None:
    """For an http(s) tracking URI: bound MLflow's retries and announce the first retry."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(h, _RetryNotice) for h in logger.handlers):
        logger.addHandler(_RetryNotice(shown_uri(), echo))


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` is MLflow giving up on a tracking server that does not answer, or
    answers only HTTP 5xx or 429 through every retry (its database down behind it: 503)."""
    import requests

    down = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,  # urllib3's retries on 429/5xx used up
    )
    cause = error.__cause__ or error.__context__
    return isinstance(error, down) or (
        isinstance(error, mlflow.exceptions.MlflowException) and isinstance(cause, down)
    )


def give_up_on_server() -> None:
    """After the budget is spent, fail the remaining calls (ending the run) at once."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"


PROCESS_TAG = "leukemia.process"  # host:pid:start of the process that works in the run
KILLED_TAG = "leukemia.killed"


_created: set[str] = set()


def open_store() -> None:
    """What every command does before it reads or writes the tracking store: a local SQLite
    store is created whole or refused in one line when it is half-created (``sqlite_store``),
    then the runs of processes that died are ended KILLED (``mark_stale_runs_killed``)."""
    uri = mlflow.get_tracking_uri()
    if uri not in _created:
        try:
            sqlite_store.ensure(uri)
        except sqlite_store.HalfCreated as error:
            raise TrackingUnavailable(str(error)) from None
        _created.add(uri)
    mark_stale_runs_killed()


def open_store_for(model_uri: str) -> None:
    """``open_store`` when a model source is read through the tracking store (a ``runs:/`` or
    ``models:/`` URI); a local folder touches no store."""
    if str(model_uri).startswith(("runs:", "models:")):
        open_store()


def mark_stale_runs_killed() -> list[str]:
    """End as KILLED the RUNNING runs whose process (``PROCESS_TAG``, on this host) is gone,
    with a tag that says why and how to continue. Returns their ids."""
    client = mlflow.tracking.MlflowClient()
    host = socket.gethostname().replace("'", "")
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    stale = client.search_runs(
        experiments,
        f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAG}` LIKE '{host}:%'",
        max_results=1000,
    )
    ended = []
    for run in stale:
        owner = run.data.tags[PROCESS_TAG]
        if not processes.is_gone(owner):
            continue
        how = _how_to_continue(run)
        client.set_tag(run.info.run_id, KILLED_TAG, f"its process {owner} is gone; {how}")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


def _how_to_continue(run) -> str:
    """What a user does about a run the sweep ends: a train run whose state is on this host
    resumes; one that logged epochs and lost its state cannot."""
    if run.data.tags.get(rec.STEP) != rec.TRAIN:
        return "run the same command again (finished child runs are reused)"
    state = run.data.tags.get(rec.TRAINING_STATE)
    if state and not os.path.isfile(state) and logged_epochs(run.info.run_id):
        return f"its training state {state} is gone, so it cannot continue: start a new run"
    return f"continue it with: leukemia train ... --resume {run.info.run_id} (same options)"


def git_commit(path: str | os.PathLike = ".") -> str:
    """The commit of the checkout ``path`` is in (``+dirty`` when it has changes), or ''."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty.strip() else "")


def flatten(params: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; tuples and lists become comma-separated text."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = value
    return flat


def log_preprocess(result, seconds: float | None) -> None:
    """Log a finished ``preprocess`` call (a PreprocessResult) to the active run."""

    params = result.params
    out_dir = Path(result.out_dir)
    seg = params["segmentation"]
    manifest_path = out_dir / "manifest.csv"
    mlflow.set_tags(
        {
            rec.STEP: rec.PREPROCESS,
            rec.ARM: arm_of(seg),
            "cache_hit": str(result.cache_hit).lower(),
            # Paths: where, not what (the cache key and the dataset input say what).
            "output_dir": str(out_dir.resolve()),
            "dataset_root": str(params["dataset_root"]),
            "source_manifest": str(params.get("source_manifest") or ""),
            **{f"preprocess.{k}": v for k, v in seg.items()},
        }
    )
    paths = ("counts", "written_by", "dataset_root", "source_manifest")
    logged = {k: v for k, v in params.items() if k not in paths}
    mlflow.log_params(flatten(logged))
    metrics = {k: float(v) for k, v in result.counts.items()}
    if seconds is not None and not result.cache_hit and seconds > 0:
        metrics.update(
            preprocess_seconds=seconds, images_per_second=result.counts["images"] / seconds
        )
    mlflow.log_metrics(metrics)
    for name in PREPROCESS_ARTIFACTS:
        if (out_dir / name).is_file():
            mlflow.log_artifact(str(out_dir / name))
    log_dataset(manifest_path, source=params["dataset_root"], context="preprocess")


# ---------------------------------------------------------------------------------------------
# Training runs
#
# Param keys are prefixed (``record``'s module docstring says why).


# Without segmentation the model sees the resized RGB image: the other options change nothing.
UNSEGMENTED_OPTIONS = ("image_size", "segment", "stain_norm", "stain_reference")


def preprocess_params(segmentation: dict) -> dict:
    """The preprocessing a model sees, as params ``preprocess.<option>``: part of a run's
    identity (reuse and resume compare them), not only tags."""
    seen = {
        k: v
        for k, v in segmentation.items()
        if (segmentation.get("segment") or k in UNSEGMENTED_OPTIONS) and v is not None
    }
    return {f"{rec.PREPROCESSING}{k}": v for k, v in seen.items()}


def training_params(
    config, rows, *, device: str, precision: str, segmentation: dict, split: dict | None = None
) -> dict:
    """Everything a training run is defined by, as flat MLflow params; ``split``: the options
    the manifest was split with (``preprocess.stored_options(folder, "split")``), logged as
    ``data.split.*`` so the run says how its test set was held out whoever started it (the
    manifest's hash is what identity compares)."""
    import timm
    import torch

    from .data import class_counts, split_fingerprint
    from .metrics import slug

    params = {f"{rec.CONFIG}{k}": v for k, v in config.to_dict().items()}
    params.update(preprocess_params(segmentation))
    params[rec.MANIFEST_HASH] = split_fingerprint(rows)
    for key, value in (split or {}).items():
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        params[f"data.split.{key}"] = shown
    for split, counts in class_counts(rows).items():
        for name, count in counts.items():
            params[f"data.{split}_{slug(name)}"] = count
    params.update(
        {
            "runtime.device": device,
            "runtime.precision": precision,
            "runtime.torch_version": torch.__version__,
            "runtime.timm_version": timm.__version__,
            rec.GIT_COMMIT: git_commit(Path(__file__).parent) or "unknown",
        }
    )
    return params


def log_params_once(params: dict) -> dict:
    """Log ``params`` to the active run, skipping keys it already holds; returns the keys whose
    logged value differs (a resumed run on another device), which are set as tags instead."""
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params
    changed = {k: v for k, v in params.items() if k in existing and existing[k] != str(v)}
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})
    if changed:
        mlflow.set_tags({f"resumed.{k}": v for k, v in changed.items()})
    return changed


def logged_epochs(run_id: str) -> int:
    """The last epoch a run has logged (0 for none): a resumed run skips records up to it."""
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "val_loss")
    return max((m.step for m in history), default=0)


def log_epoch(record: dict) -> None:
    keys = (
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "lr",
        "epoch_seconds",
        "images_per_second",
    )
    mlflow.log_metrics({k: float(record[k]) for k in keys}, step=record["epoch"])


def log_dataset(manifest_path, source: str, context: str) -> None:
    """A manifest as the run's input dataset (what MLflow's UI shows under Datasets)."""
    _log_input(_dataset(manifest_path, source, "manifest"), context)


# The contexts the split datasets are logged under, as MLflow's UI shows them.
SPLIT_CONTEXTS = {"val": "validation", "test": "testing"}


def log_split_datasets(manifest_path, source: str) -> dict:
    """The validation and test splits of a manifest as input datasets of the active run (named
    ``val`` and ``test``); returns them, for the metrics measured on each (``dataset=``)."""
    datasets = {}
    for split, context in SPLIT_CONTEXTS.items():
        datasets[split] = _dataset(manifest_path, source, split)
        _log_input(datasets[split], context)
    return datasets


def _dataset(manifest_path, source: str, split: str):
    """A manifest (``split`` "manifest": all of it; else its rows of that split) as an MLflow
    dataset named ``split``."""
    import pandas as pd

    manifest = pd.read_csv(manifest_path, dtype={"dhash": str})
    if split != "manifest":
        manifest = manifest[manifest["split"] == split].reset_index(drop=True)
    with warnings.catch_warnings():
        # MLflow hints about integer columns and guesses between two local source types.
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(manifest, source=str(source), targets="label", name=split)


def _log_input(dataset, context: str) -> None:
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as error:
            # Runs in parallel (compare --jobs) log the same manifest: MLflow's store looks the
            # dataset up, then inserts it, and the slower of two inserts breaks the unique key.
            # Again, it finds the one the other run stored.
            text = str(error).lower()
            if attempt == 2 or not ("unique" in text or "duplicate key" in text):
                raise
            time.sleep(0.5 * (attempt + 1))


def log_robustness(table: list[dict], extra: dict | None = None) -> None:
    """A robustness table (``evaluation.robustness_table``) in the active run: metrics
    ``robust_<condition>_accuracy``/``_f1_macro`` for the perturbed conditions (with ``extra``
    metrics) and ``evaluation/robustness.json``; what train and evaluate runs both log."""
    mlflow.log_metrics(
        {
            f"robust_{row['condition']}_{metric}": row[metric]
            for row in table
            if row["condition"] != "clean"
            for metric in ("accuracy", "f1_macro")
        }
        | (extra or {})
    )
    mlflow.log_dict({"conditions": table}, rec.ROBUSTNESS)


def log_evaluation(
    result: dict,
    prefix: str,
    paths=None,
    artifact_dir: str | None = None,
    *,
    dataset=None,
    model_id: str | None = None,
):
    """Log an ``engine.evaluate`` result as ``{prefix}accuracy`` ... metrics (measured on
    ``dataset``, of the logged model ``model_id``, where given); with ``artifact_dir``, also the
    confusion matrix (figure and JSON), the classification report (text and JSON), the
    reliability diagram and per-image predictions. Returns the metrics."""
    import numpy as np
    import pandas as pd

    from . import figures, metrics
    from .data import CLASSES, prob_column

    labels = np.asarray(result["labels"])
    probabilities = np.asarray(result["probabilities"], dtype=np.float64)
    report = metrics.classification_metrics(labels, probabilities, loss=result.get("loss"))
    mlflow.log_metrics(
        metrics.flat_metrics(report, prefix=prefix), dataset=dataset, model_id=model_id
    )
    if artifact_dir is None:
        return report
    mlflow.log_text(report["report"], f"{artifact_dir}/classification_report.txt")
    mlflow.log_dict(report["report_dict"], f"{artifact_dir}/classification_report.json")
    mlflow.log_dict(
        {
            "classes": list(CLASSES),
            "counts": report["confusion_matrix"],
            "row_normalized": report["confusion_matrix_normalized"],
        },
        f"{artifact_dir}/confusion_matrix.json",
    )
    figure = figures.confusion_figure(
        report["confusion_matrix"], normalized=report["confusion_matrix_normalized"]
    )
    mlflow.log_figure(figure, f"{artifact_dir}/confusion_matrix.png")
    mlflow.log_figure(
        figures.reliability_figure(labels, probabilities), f"{artifact_dir}/reliability.png"
    )
    table = pd.DataFrame(
        {
            "path": list(paths) if paths is not None else range(len(labels)),
            "label": labels,
            "predicted": probabilities.argmax(1),
            **{prob_column(name): probabilities[:, c] for c, name in enumerate(CLASSES)},
        }
    )
    mlflow.log_text(table.to_csv(index=False), f"{artifact_dir}/{rec.PREDICTIONS_FILE}")
    return report


def log_curves(history: list[dict], phase2_start_epoch: int | None) -> None:
    from . import figures

    if history:
        mlflow.log_figure(figures.curves_figure(history, phase2_start_epoch), "curves.png")
        mlflow.log_dict({"epochs": history}, "history.json")


def log_checkpoint_model(classifier, spec, name: str, step: int, linked: dict, dataset) -> str:
    """A checkpoint as a logged model of the active run (MLflow 3's Models tab): ``name`` at
    ``step`` (its epoch), holding the served model's two data files (weights.safetensors and
    model.json, nothing that runs), with the ``linked`` metrics (measured on ``dataset``)
    attached to it. Returns its model id."""
    import tempfile

    from mlflow.entities import LoggedModelOutput

    from . import model_files

    run_id = mlflow.active_run().info.run_id
    model = mlflow.initialize_logged_model(name=name, source_run_id=run_id)
    client = mlflow.tracking.MlflowClient()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_files.write(tmp, classifier, spec)
            client.log_model_artifacts(model.model_id, tmp)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        mlflow.log_metrics(linked, step=step, model_id=model.model_id, dataset=dataset)
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def log_checkpoint(classifier, spec) -> None:
    """The best weights as ``checkpoint/weights.safetensors`` plus ``checkpoint/model.json``
    (a ``model_files.ModelSpec``): the served model's two files, so either can be evaluated."""
    import tempfile

    from . import model_files

    with tempfile.TemporaryDirectory() as tmp:
        model_files.write(tmp, classifier, spec)
        mlflow.log_artifacts(tmp, "checkpoint")
