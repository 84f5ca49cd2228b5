"""The one library module that talks to MLflow.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else MLflow's default (``sqlite:///mlflow.db`` in
the working directory). Under ``mlflow run`` the entry point's run is reused (MLFLOW_RUN_ID).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from pathlib import Path

import mlflow

DEFAULT_EXPERIMENT = "leukemia"
PREPROCESS_ARTIFACTS = ("manifest.csv", "audit.json", "params.json", "preview.png")


@contextlib.contextmanager
def start_run(run_name: str, experiment: str | None = None, nested: bool = False, tags=None):
    """Start (or, under ``mlflow run``, resume) a run in ``experiment``.

    The experiment is left alone when MLflow already has one from the environment
    (``MLFLOW_EXPERIMENT_NAME``/``_ID``, or the run ``mlflow run`` created).
    """
    from_environment = any(
        os.environ.get(name)
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
    )
    if not nested and (experiment or not from_environment):
        mlflow.set_experiment(experiment or DEFAULT_EXPERIMENT)
    with mlflow.start_run(run_name=run_name, nested=nested, tags=tags) as run:
        yield run


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
    import pandas as pd

    params = result.params
    out_dir = Path(result.out_dir)
    seg = params["segmentation"]
    manifest_path = out_dir / "manifest.csv"
    mlflow.set_tags(
        {
            "step": "preprocess",
            "arm": "proposed" if seg["segment"] else "baseline",
            "cache_hit": str(result.cache_hit).lower(),
            **{f"preprocess.{k}": v for k, v in seg.items()},
        }
    )
    logged = {k: v for k, v in params.items() if k not in ("counts", "written_by")}
    mlflow.log_params(flatten({**logged, "output_dir": str(out_dir.resolve())}))
    metrics = {k: float(v) for k, v in result.counts.items()}
    if seconds is not None and not result.cache_hit and seconds > 0:
        metrics.update(
            preprocess_seconds=seconds, images_per_second=result.counts["images"] / seconds
        )
    mlflow.log_metrics(metrics)
    for name in PREPROCESS_ARTIFACTS:
        if (out_dir / name).is_file():
            mlflow.log_artifact(str(out_dir / name))
    manifest = pd.read_csv(manifest_path, dtype={"dhash": str})
    with warnings.catch_warnings():
        # MLflow hints about integer columns and guesses between two local source types.
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            manifest, source=params["dataset_root"], targets="label", name="manifest"
        )
        mlflow.log_input(dataset, context="preprocess")
