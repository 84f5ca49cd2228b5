"""One tracked training run: check everything, start (or resume) the MLflow run, train, log.

The order matters to users: every check that can fail on bad input (config, model name,
weights download, image size, device, data, resume id) runs before a run is started, so a
mistake never leaves a RUNNING run behind. A run interrupted later keeps its training state in
``<work_root>/<run id>/state.pt``; ``resume=<run id>`` continues it inside the same MLflow run.

Artifacts a training run writes (names other steps rely on):

- ``curves.png``, ``history.json``: accuracy and loss per epoch, the phase boundary marked;
- ``evaluation/``: confusion matrix (png, json), classification report (txt, json),
  reliability diagram, ``predictions.csv`` (per test image: label, prediction, probabilities);
  ``robustness.json`` (the test split's raw images under each perturbation, scored as served:
  accuracy, F1, ECE per condition) and ``robustness_predictions.csv`` (per test image: label and
  the predicted class under each condition, what a study pairs across arms);
- metrics ``robust_<condition>_accuracy``/``_f1_macro`` and ``robust_worst_accuracy`` (the
  lowest over the perturbed conditions; the tag ``robust_worst_condition`` names it);
- ``checkpoint/weights.safetensors`` + ``checkpoint/model.json``: the best weights, and what
  rebuilds and preprocesses for them (the served model's two files);
- ``classifier``: the served pyfunc (raw image in, its own preprocessing, probabilities out),
  registered as a new version (alias ``challenger``) of ``register_as`` when given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from .. import engine, evaluation, figures, inference, metrics, registry, serving, tracking, ui
from .. import record as rec
from .. import train as training
from ..arms import arm_of
from ..config import TrainConfig
from ..data import read_manifest
from ..model_files import ModelSpec
from ..preprocess import stored_options


class ResumeError(ValueError):
    """The run to resume does not exist, is finished, or was made with other settings."""


def check_resumable(run_id: str, params: dict) -> None:
    """Raise unless ``run_id`` is an unfinished training run made with the same ``params``."""
    client = mlflow.tracking.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ResumeError(
            f"no MLflow run {run_id!r} in {tracking.shown_uri()}; resume expects the id of "
            "an interrupted train run"
        ) from None
    if run.data.tags.get(rec.STEP) != rec.TRAIN:
        raise ResumeError(f"run {run_id!r} is not a train run; resume expects one")
    if run.info.status == "FINISHED":
        raise ResumeError(f"run {run_id!r} already finished; there is nothing to resume")
    defining = {
        k: v
        for k, v in params.items()
        if k.startswith(rec.IDENTITY_PREFIXES) and k != rec.PROCESSED_DIR
    }
    logged = run.data.params
    differ = sorted(k for k, v in defining.items() if k in logged and logged[k] != str(v))
    if differ:
        shown = ", ".join(f"{k}={logged[k]} (now {defining[k]})" for k in differ[:5])
        raise ResumeError(
            f"run {run_id!r} was made with other settings: {shown}; resume with the same "
            "config and data, or start a new run"
        )


def _check_saved_state(run_id: str, work_dir: Path, echo) -> None:
    """A run killed before its first epoch ended has no state and starts again from epoch 1;
    one that logged epochs but lost its state cannot continue."""
    if (work_dir / training.STATE_FILE).is_file():
        return
    logged = tracking.logged_epochs(run_id)
    if logged:
        raise ResumeError(
            f"run {run_id!r} logged {logged} epoch(s) but its training state "
            f"{str(work_dir / training.STATE_FILE)!r} is gone (deleted, or another "
            "LEUKEMIA_CACHE_DIR); it cannot continue: start a new run"
        )
    echo(
        f"run {run_id} has no saved state (killed before its first epoch ended): "
        "training starts again from epoch 1 in the same run"
    )


def run_training(
    config: TrainConfig,
    processed_dir,
    *,
    segmentation: dict,
    work_root,
    experiment: str | None = None,
    resume: str | None = None,
    register_as: str | None = None,
    origin: dict | None = None,
    echo=print,
) -> str:
    """Train ``config`` on a preprocess output folder in a tracked run; returns the run id.

    ``origin`` (``config``: the YAML's path, ``data_dir``: the dataset as given) goes into the
    run's description and tags: where the settings and images came from."""
    job = _prepare(config, Path(processed_dir), segmentation, origin)
    if resume:
        check_resumable(resume, job.params)
        _check_saved_state(resume, Path(work_root) / resume, echo)
    launched_by = os.environ.get("MLFLOW_RUN_ID") if resume else None
    run_id = resume
    try:
        with tracking.start_run(
            f"train-{job.arm}", experiment, run_id=resume, tags=job.tags
        ) as run:
            run_id = run.info.run_id
            if launched_by and launched_by != run_id:
                # `mlflow run -P resume=<id>` made a run of its own; point it at the real one.
                mlflow.tracking.MlflowClient().set_tag(launched_by, "resumed_run_id", run_id)
            echo(f"MLflow run {run_id} ({job.arm} arm, {job.device}, {job.precision.name})")
            ui.describe(run_id, job.note(), name=job.name)
            work_dir = Path(work_root) / run_id
            mlflow.set_tag(rec.TRAINING_STATE, str(work_dir.resolve() / training.STATE_FILE))
            version = _train_and_log(job, work_dir, bool(resume), register_as, echo)
            final = mlflow.get_run(run_id).data.metrics
            if version is not None:
                alias = _alias(register_as, version)
                job.origin["registered"] = f"{register_as} version {version}{alias}"
            ui.describe(run_id, job.note(final))
    except KeyboardInterrupt:
        if run_id:
            mlflow.tracking.MlflowClient().set_terminated(run_id, "KILLED")
            echo(f"\ninterrupted; continue with the same command and --resume {run_id}")
        raise
    except Exception as error:
        if not tracking.unreachable(error):
            raise
        then = "try again"
        if run_id:
            then = f"the training state is saved: continue with --resume {run_id}"
        raise tracking.TrackingUnavailable(
            f"MLflow tracking server {tracking.shown_uri()} is unreachable; {then} when it is back"
        ) from None
    _echo_done(echo, run_id, job.name, final, register_as, version, run.info.experiment_id)
    return run_id


@dataclass
class _Job:
    """A training run's inputs, resolved and checked before any run exists."""

    config: TrainConfig
    processed_dir: Path
    rows: list
    segmentation: dict
    classifier: object
    device: object
    precision: engine.Precision
    params: dict  # logged params: the run's identity
    tags: dict
    origin: dict  # the description's: where settings and images came from
    arm: str

    @property
    def name(self) -> str:
        return f"{self.arm} seed {self.config.seed}"

    def note(self, final: dict | None = None) -> str:
        return ui.train_note(
            self.arm, self.config.seed, self.origin, self.config, self.segmentation, final
        )


def _prepare(config: TrainConfig, processed_dir: Path, segmentation: dict, origin) -> _Job:
    """Every check that can fail on bad input (model name, weights, image size, device, data),
    and the run's params and tags."""
    rows = read_manifest(processed_dir / "manifest.csv")
    classifier = training.build_classifier(config, segmentation["image_size"])
    device = training.resolve_device(config.device)
    precision = engine.resolve_precision(config.precision, device)
    training.check_training_split([int(r["label"]) for r in rows if r["split"] == "train"])
    params = tracking.training_params(
        config,
        rows,
        device=str(device),
        precision=precision.name,
        segmentation=segmentation,
        split=_split_options(processed_dir),
    )
    arm = arm_of(segmentation, config.to_dict())
    origin = {
        **(origin or {}),
        "manifest_hash": params[rec.MANIFEST_HASH],
        "preprocessing": ", ".join(f"{k} {v}" for k, v in segmentation.items()),
    }
    tags = {
        rec.STEP: rec.TRAIN,
        rec.ARM: arm,
        **{f"{rec.PREPROCESSING}{k}": str(v) for k, v in segmentation.items()},
        # Paths that differ between machines without changing what the model sees: tags.
        rec.PROCESSED_DIR: str(processed_dir.resolve()),
        rec.DATA_SOURCE: str(origin.get("data_dir", "")),
        rec.CONFIG_FILE: str(origin.get("config", "")),
        rec.HARDWARE: training.hardware(device),
    }
    return _Job(
        config, processed_dir, rows, segmentation, classifier, device, precision, params, tags,
        origin, arm,
    )  # fmt: skip


def _split_options(processed_dir: Path) -> dict | None:
    try:
        return stored_options(processed_dir, "split")
    except ValueError:
        return None  # not a preprocess output folder: its manifest's hash still says the split


def _alias(name: str, version: str) -> str:
    """``, alias @challenger`` if the registry says so now, else which version holds it."""
    holder = registry.aliased(name, registry.CHALLENGER)
    if holder == str(version):
        return f", alias @{registry.CHALLENGER}"
    if holder:
        return f" (not @{registry.CHALLENGER}: version {holder} is newer)"
    return f" (no @{registry.CHALLENGER} set)"


def _echo_done(echo, run_id, name, final, register_as, version, experiment_id) -> None:
    """What a user wants to know, and do, when a run finishes."""
    echo(
        f"\nrun {run_id} ({name}): test accuracy {final['test_accuracy']:.4f}, F1 macro "
        f"{final['test_f1_macro']:.4f} (best epochs: phase 1 "
        f"{final.get('phase1_best_epoch', 0):.0f}, phase 2 "
        f"{final.get('phase2_best_epoch', 0):.0f})"
    )
    if version is not None:
        echo(f"registered: {register_as} version {version}{_alias(register_as, version)}")
    echo("next:")
    echo("  compare both arms, with statistics:  leukemia compare  (or mlflow run . -e compare)")
    if version is not None:
        echo(f"  make it the champion:                leukemia promote {version}")
        uri = f"models:/{register_as}/{version}"
        echo(f"  serve it:                            leukemia serve -m {uri}")
    echo(f"  look at it (after `mlflow ui`):      {ui.run_url(experiment_id, run_id)}")


def _calibrate(validation: dict, test: dict) -> float:
    """Temperature scaling fitted on the validation split (``metrics.fit_temperature``), stored
    with the model so the served probabilities are calibrated; logs the temperature and the
    test split's ECE and Brier score before (``test_ece``, ``test_brier``) and after."""
    temperature = metrics.fit_temperature(validation["labels"], validation["probabilities"])
    logged = {"calibration_temperature": temperature}
    if test:
        after = metrics.calibration_summary(test["labels"], test["probabilities"], temperature)
        logged.update(
            test_ece_calibrated=after["ece_calibrated"],
            test_brier_calibrated=after["brier_calibrated"],
        )
    mlflow.log_metrics(logged)
    return temperature


def _log_robustness(classifier, spec, processed_dir: Path, device, echo) -> None:
    """Score the test split's raw images under every perturbation as the served model would
    (``evaluation.evaluate_manifest``) and log the table, the worst case and each image's
    predicted class per condition (see the module). A dataset that is no longer where
    preprocess read it is said in one line and skipped: the run itself is complete."""
    model = inference.LeukemiaModel(classifier.eval(), spec, device, "training")
    conditions = tuple(evaluation.PERTURBATIONS)
    try:
        results = evaluation.evaluate_manifest(
            model, processed_dir / "manifest.csv", None, "test", conditions
        )
    except ValueError as error:
        echo(f"robustness not measured: {error}")
        return
    table = evaluation.robustness_table(results)
    worst = evaluation.worst_case(table)
    tracking.log_robustness(table, {"robust_worst_accuracy": worst["accuracy"]})
    mlflow.set_tag("robust_worst_condition", worst["condition"])
    clean = results["clean"]
    columns = {"path": clean["paths"], "label": clean["labels"]}
    columns |= {name: result["probabilities"].argmax(1) for name, result in results.items()}
    mlflow.log_text(pd.DataFrame(columns).to_csv(index=False), rec.ROBUSTNESS_PREDICTIONS)
    echo(
        f"robustness: worst {worst['condition']} {worst['accuracy']:.4f} (clean "
        f"{table[0]['accuracy']:.4f})"
    )


class _EpochLogger:
    """What training reports as it goes: each epoch (printed; logged once, even when resumed),
    each phase's summary, its best checkpoint as a logged model with the validation and test
    metrics it scored linked to it, and the final phase's evaluation artifacts."""

    def __init__(self, job: _Job, already_logged: int, datasets: dict, echo):
        self.job, self.datasets = job, datasets
        self.already_logged, self.echo = already_logged, echo
        self.last_phase = training.phases(job.config)[-1]
        self.test_paths = [r["path"] for r in job.rows if r["split"] == "test"]
        self.final_test = {}

    def on_epoch(self, record: dict) -> None:
        self.echo(
            f"epoch {record['epoch']:>3} {record['phase']}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f} | val loss {record['val_loss']:.4f} acc "
            f"{record['val_accuracy']:.4f} | {record['epoch_seconds']:.1f} s"
        )
        if record["epoch"] > self.already_logged:  # a resumed run does not log an epoch twice
            tracking.log_epoch(record)
            ui.log_confusion_image("val_confusion", record["val_confusion"], record["epoch"])

    def on_phase_end(self, phase, model, summary: dict, test: dict | None) -> None:
        mlflow.log_metrics(
            {
                k: float(v)
                for k, v in summary.items()
                if k.startswith(phase.name) or k == "phase2_start_epoch"
            }
        )
        checkpoint = self._log_checkpoint(phase, model, summary[f"{phase.name}_best_epoch"])
        test_set = self.datasets["test"]
        tracking.log_evaluation(
            test, prefix=f"{phase.name}_test_", dataset=test_set, model_id=checkpoint
        )
        if phase == self.last_phase:
            self.final_test.update(test or {})
            report = tracking.log_evaluation(
                test,
                prefix="test_",
                paths=self.test_paths,
                artifact_dir=rec.EVALUATION,
                dataset=test_set,
            )
            # Step 0, not the last epoch: the chart view's image card opens at step 0 and moves
            # only when every run it shows has one step (MLflow 3.17's UI); runs end at
            # different epochs, so an end-of-training image at its epoch never drew on opening.
            ui.log_confusion_image("test_confusion", report["confusion_matrix"], 0)

    def _log_checkpoint(self, phase, model, best_epoch: int) -> str:
        """The phase's best weights as the logged model ``<phase>-best`` at its epoch, with
        that epoch's validation metrics linked to it as ``<phase>_best_val_loss`` and
        ``_accuracy`` (new keys: linking ``val_loss`` itself would log its point twice). They
        are read back from the run: a resumed run may have logged that epoch before."""
        client = mlflow.tracking.MlflowClient()
        run_id = mlflow.active_run().info.run_id
        linked = {
            f"{phase.name}_best_{key}": point.value
            for key in ("val_loss", "val_accuracy")
            for point in client.get_metric_history(run_id, key)
            if point.step == best_epoch
        }
        mean, std = training.normalisation(model)
        spec = ModelSpec.for_classifier(
            model,
            model_name=self.job.config.model,
            dropout=self.job.config.dropout,
            mean=mean,
            std=std,
            segmentation=self.job.segmentation,
        )
        name = f"{phase.name}-best"
        return tracking.log_checkpoint_model(
            model, spec, name, best_epoch, linked, self.datasets["val"]
        )


def _train_and_log(job: _Job, work_dir: Path, resume: bool, register_as, echo) -> str | None:
    """Train and log inside the active run; returns the registered version, if any."""
    run_id = mlflow.active_run().info.run_id
    tracking.log_params_once(job.params)
    tracking.log_dataset(
        job.processed_dir / "manifest.csv", source=job.processed_dir.resolve(), context="training"
    )
    datasets = tracking.log_split_datasets(
        job.processed_dir / "manifest.csv", source=job.processed_dir.resolve()
    )
    logger = _EpochLogger(job, tracking.logged_epochs(run_id) if resume else 0, datasets, echo)
    with tracking.system_metrics(run_id):
        result = training.train(
            job.config,
            job.processed_dir,
            work_dir,
            on_epoch=logger.on_epoch,
            on_phase_end=logger.on_phase_end,
            resume=resume,
            classifier=job.classifier,
            device=job.device,
            precision=job.precision,
        )
    summary, model = result["summary"], result["model"]
    tracking.log_curves(result["history"], summary.get("phase2_start_epoch"))
    if result["history"]:
        curves = figures.curves_figure(result["history"], summary.get("phase2_start_epoch"))
        ui.log_figure_image("curves", curves, 0)  # step 0: see test_confusion
    temperature = _calibrate(result["validation"], logger.final_test)
    spec = ModelSpec.for_classifier(
        model,
        model_name=job.config.model,
        dropout=job.config.dropout,
        mean=result["mean"],
        std=result["std"],
        segmentation=job.segmentation,
        temperature=temperature,
    )
    tracking.log_checkpoint(model, spec)
    served = serving.log_served_model(model, spec, name="classifier")
    # The served model's test metrics, linked to it and to the test split they are measured on
    # (MLflow's log_model links the run's step-0 metrics by logging them again, without their
    # dataset: so here again, with it).
    final = mlflow.get_run(run_id).data.metrics
    mlflow.log_metrics(
        {k: v for k, v in final.items() if k.startswith("test_")},
        model_id=served.model_id,
        dataset=datasets["test"],
    )
    _log_robustness(model, spec, job.processed_dir, job.device, echo)
    if not register_as:
        return None
    version = registry.register_run_model(run_id, served.model_uri, register_as)
    mlflow.set_tag(rec.REGISTERED_VERSION, f"{register_as}/{version.version}")
    return str(version.version)
