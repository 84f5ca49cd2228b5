"""The ``evaluate`` step: a logged classifier on a manifest's raw images, clean and perturbed,
as one MLflow run (tags ``step=evaluate``, ``model_uri``, ``split``, ``model_version`` when an
alias named it, ``evaluate.manifest``, ``evaluate.dataset_root``, and ``evaluate.data``: whether
the manifest is the model's own training manifest, which is the default), with:

- metrics ``{split}_accuracy``, ``{split}_f1_macro``, ... named as in training runs, and
  ``{split}_accuracy_ci_low``/``_high``, ``{split}_f1_macro_ci_low``/``_high`` (95 % bootstrap);
- metrics ``robust_<perturbation>_accuracy`` and ``robust_<perturbation>_f1_macro``;
- artifacts under ``evaluation/``: what ``tracking.log_evaluation`` writes for the clean images
  (confusion matrix, classification report, reliability diagram, ``predictions.csv``),
  ``robustness.json`` and ``robustness.csv`` (one row per condition: accuracy, f1_macro,
  roc_auc_macro, ece, accuracy_drop vs clean), ``gradcam.png``, and ``misclassified.json``:
  a table of the images the model gets wrong (true and predicted class, confidence, the model
  input and its Grad-CAM), which the UI shows in its table view.

The maths (loading, perturbations, robustness, Grad-CAM) is ``leukemia.evaluation``'s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from .. import evaluation, gradcam, metrics, model_files, model_uri, tracking
from .. import record as rec
from ..data import CLASSES, read_manifest, split_fingerprint
from ..inference import LeukemiaModel


def load_model(source: str) -> LeukemiaModel:
    """A model from a URI (``runs:/``, ``models:/``) or a local folder or file
    (``model_uri.resolve``): only its two data files are read (``model_files``)."""
    with tempfile.TemporaryDirectory(prefix="leukemia-evaluate-") as scratch:
        local, name = model_uri.resolve(source, scratch)
        return LeukemiaModel.from_folder(model_files.find_folder(local, source), name)


def training_data(source: str) -> dict:
    """What the model behind ``source`` trained on, as its run recorded it: ``run_id``,
    ``manifest`` (the preprocess folder's ``manifest.csv``) and ``manifest_hash``; ``{}`` for a
    model folder, which records no run."""
    run_id = model_uri.source_run_id(source)
    if not run_id:
        return {}
    try:
        run = mlflow.tracking.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return {}
    # Older runs logged the folder as a param.
    folder = run.data.tags.get(rec.PROCESSED_DIR) or run.data.params.get(rec.PROCESSED_DIR)
    return {
        "run_id": run_id,
        "manifest": Path(folder, "manifest.csv") if folder else None,
        "manifest_hash": run.data.params.get(rec.MANIFEST_HASH),
    }


def choose_manifest(source: str, manifest_path) -> tuple[Path, str]:
    """The manifest to score on and, in words, how it relates to the model's training data.

    No ``manifest_path``: the model's own (recorded with its run); a manifest of other data is
    allowed, and named as such."""
    own = training_data(source)
    if manifest_path is None:
        recorded = own.get("manifest")
        if recorded is None:
            raise ValueError(
                f"model {source!r} records no training manifest (a model folder, or a run "
                "without one); pass --manifest PATH (a manifest.csv written by preprocess)"
            )
        if not recorded.is_file():
            raise ValueError(
                f"the manifest model {source!r} trained on, {str(recorded)!r}, is gone (another "
                "machine, or a deleted folder); pass --manifest PATH, or preprocess the dataset "
                "again with the same options"
            )
        return recorded, "the model's own training manifest"
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise ValueError(f"manifest {str(manifest_path)!r} does not exist; expected a manifest.csv")
    if not own.get("manifest_hash"):
        return manifest_path, "a manifest the model records nothing about (no training run)"
    given = split_fingerprint(read_manifest(manifest_path))
    if given == own["manifest_hash"]:
        return manifest_path, "the model's own training manifest"
    return manifest_path, (
        f"NOT the model's training data (manifest {given[:12]}, the model trained on "
        f"{own['manifest_hash'][:12]} in run {own['run_id']})"
    )


def run(
    source: str,
    manifest_path=None,
    *,
    dataset_root=None,
    split: str = "test",
    robustness: bool = True,
    gradcam_per_class: int = 2,
    bootstrap: int = metrics.N_RESAMPLES,
    experiment: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    nested: bool = False,
) -> dict:
    """Evaluate ``source`` on the ``split`` of a manifest in one MLflow run (see the module);
    ``nested``: as a child of the active run (the ``main`` study).

    Everything is computed before the run starts: a bad model, manifest or dataset never
    leaves a failed run. ``bootstrap`` resamples (0: no intervals); ``robustness``: every
    perturbation, else clean only. Returns ``run_id``, ``n_images``, ``accuracy``,
    ``f1_macro``, ``accuracy_ci`` and ``f1_macro_ci`` (``(low, high)``, or None with the reason
    in ``no_interval``), ``robustness`` (the table's rows), ``manifest`` and ``data`` (how it
    relates to the model's training data, in words).
    """
    if bootstrap < 0 or gradcam_per_class < 0:
        raise ValueError(
            f"bootstrap and gradcam_per_class must be >= 0, got {bootstrap}, {gradcam_per_class}"
        )
    model = _load_checked(source)
    manifest_path, relation = choose_manifest(source, manifest_path)
    root = evaluation.resolve_dataset_root(manifest_path, dataset_root)
    conditions = tuple(evaluation.PERTURBATIONS) if robustness else ("clean",)
    results = evaluation.evaluate_manifest(
        model, manifest_path, root, split, conditions, seed, batch_size
    )
    clean_result, n_images = results["clean"], len(results["clean"]["labels"])
    intervals, no_interval = _intervals(clean_result, manifest_path, bootstrap, seed)
    table = evaluation.robustness_table(results)
    samples = gradcam.gradcam_samples(manifest_path, root, split, model, gradcam_per_class)
    figure = gradcam.gradcam_figure(model, samples) if samples else None
    errors = _misclassified(model, manifest_path, root, clean_result)
    tags = _tags(source, model, split, relation, manifest_path, root)
    with tracking.start_run("evaluate", experiment, nested=nested, tags=tags) as run:
        _log_params(model, n_images, conditions, bootstrap, seed, manifest_path)
        report = _log_results(model, clean_result, split, intervals)
        _log_views(table if robustness else None, figure, errors)
    return {
        "run_id": run.info.run_id,
        "n_images": n_images,
        "accuracy": report["accuracy"],
        "f1_macro": report["f1_macro"],
        **_as_pairs(intervals),
        "robustness": table,
        "manifest": str(manifest_path),
        "data": relation,
        "no_interval": no_interval,
    }


MISCLASSIFIED = f"{rec.EVALUATION}/misclassified.json"  # the UI's table view shows it
MAX_MISCLASSIFIED = 16  # rows (two images, four files each): the most confident mistakes


def _misclassified(
    model: LeukemiaModel, manifest_path: Path, root: Path, clean: dict
) -> pd.DataFrame:
    """The images the model gets wrong, the most confident mistakes first (at most
    ``MAX_MISCLASSIFIED``): path, true and predicted class, the served confidence, the model
    input and the Grad-CAM of the predicted class over it (``mlflow.Image``, for
    ``mlflow.log_table``)."""
    probabilities = clean["probabilities"]
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != clean["labels"])
    confidence = probabilities[wrong, predicted[wrong]]
    chosen = wrong[np.argsort(-confidence, kind="stable")][:MAX_MISCLASSIFIED]
    rows = {row["path"]: row for row in read_manifest(manifest_path)}
    records = []
    for i in chosen:
        path = clean["paths"][i]
        rgb = evaluation.read_raw(root, rows[path], int(model.max_pixels))
        image, cam = gradcam.overlay(model, rgb)
        records.append(
            {
                "path": path,
                "true": model.classes[int(clean["labels"][i])],
                "predicted": model.classes[int(predicted[i])],
                "confidence": round(float(probabilities[i, predicted[i]]), 4),
                "image": mlflow.Image(image),
                "gradcam": mlflow.Image(cam),
            }
        )
    return pd.DataFrame(records)


def _log_views(table: list[dict] | None, figure, errors: pd.DataFrame) -> None:
    """The robustness table, the Grad-CAM figure and the misclassified images, where there are
    any, in the active run."""
    if table is not None:
        tracking.log_robustness(table)
        mlflow.log_text(_csv(table), f"{rec.EVALUATION}/robustness.csv")
    if figure is not None:
        mlflow.log_figure(figure, f"{rec.EVALUATION}/gradcam.png")
    if len(errors):
        mlflow.log_table(errors, artifact_file=MISCLASSIFIED)


def _as_pairs(intervals: dict) -> dict:
    """``{"accuracy_ci": (low, high) or None, ...}`` for every bootstrapped metric."""
    return {
        f"{metric}_ci": (intervals[metric]["low"], intervals[metric]["high"])
        if metric in intervals
        else None
        for metric in metrics.BOOTSTRAP_METRICS
    }


def _log_params(model, n_images: int, conditions, bootstrap: int, seed: int, manifest_path):
    # Prefixed keys: `mlflow run` logs its own -P parameters under the plain names.
    mlflow.log_params(
        {
            "evaluate.model": model.spec.model,
            "evaluate.image_size": model.image_size,
            "evaluate.images": n_images,
            "evaluate.perturbations": ",".join(conditions),
            "evaluate.bootstrap": bootstrap,
            "evaluate.seed": seed,
            # The key training runs use: equal values mean the same split of the same files.
            rec.MANIFEST_HASH: split_fingerprint(read_manifest(manifest_path)),
        }
    )


def _load_checked(source: str):
    model = load_model(source)
    if tuple(model.classes) != CLASSES:
        raise ValueError(f"model classes {model.classes} differ from the dataset's {CLASSES}")
    return model


def _tags(source: str, model, split: str, relation: str, manifest_path: Path, root: Path):
    tags = {
        rec.STEP: rec.EVALUATE,
        "model_uri": model.source,
        "split": split,
        "evaluate.data": relation,
        "evaluate.manifest": str(manifest_path.resolve()),
        "evaluate.dataset_root": str(root.resolve()),
    }
    version = model_uri.alias_version(source)
    if version:
        tags["model_version"] = version  # what an alias pointed to at evaluation time
    return tags


def _intervals(clean: dict, manifest_path, bootstrap: int, seed: int):
    """Bootstrap intervals per metric over the groups the images were held out in (duplicates,
    index blocks), or ``({}, why there are none)``."""
    labels = clean["labels"]
    if not bootstrap:
        return {}, "no interval: --bootstrap 0"
    if len(labels) < 2:
        return {}, f"no interval: {len(labels)} image(s) cannot be resampled"
    predictions = clean["probabilities"].argmax(axis=1)
    group_of = {
        row["path"]: row.get("group") or row["path"] for row in read_manifest(manifest_path)
    }
    groups = [group_of[path] for path in clean["paths"]]
    intervals = {
        metric: metrics.bootstrap_ci(
            labels, predictions, metric, n_resamples=bootstrap, seed=seed, groups=groups
        )
        for metric in metrics.BOOTSTRAP_METRICS
    }
    return intervals, None


def _log_results(model, clean: dict, split: str, intervals: dict) -> dict:
    """Log the clean evaluation and its intervals in the active run; returns the report.

    The served probabilities are calibrated (softmax(logits / T), T fitted on the validation
    split in training); dividing log p by 1/T undoes it. As in a train run, the plain keys and
    files are the network's own softmax, *_calibrated the served."""
    labels, probabilities = clean["labels"], clean["probabilities"]
    temperature = model.spec.temperature
    own = metrics.temperature_scaled(probabilities, 1 / temperature)
    report = tracking.log_evaluation(
        {"labels": labels, "probabilities": own},
        prefix=f"{split}_",
        paths=clean["paths"],
        artifact_dir=rec.EVALUATION,
    )
    mlflow.log_metrics(
        {
            "calibration_temperature": temperature,
            f"{split}_ece_calibrated": metrics.expected_calibration_error(labels, probabilities),
            f"{split}_brier_calibrated": metrics.brier_score(labels, probabilities),
            **{
                f"{split}_{metric}_ci_{side}": interval[side]
                for metric, interval in intervals.items()
                for side in ("low", "high")
            },
        }
    )
    return report


def _csv(table: list[dict]) -> str:
    return pd.DataFrame(table).to_csv(index=False)
