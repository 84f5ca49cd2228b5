"""``leukemia`` command line: each command unpacks its options and calls the library."""

from __future__ import annotations

import errno
import json
import os

import click

from . import cli_models, cli_report, cli_search, processes, slurm, synthetic, tracking
from . import options as cli_options
from .config import PREPROCESS_FIELDS, TRAIN_FIELDS, TrainConfig, load_experiment
from .data import DatasetError
from .options import Failure as _Failure
from .registry import DEFAULT_NAME, PROMOTION_METRIC
from .steps import compare as compare_step
from .steps import main as main_step
from .steps import preprocess as preprocess_step
from .steps import statistics


class _Commands(click.Group):
    """Turns a failing file system (read-only, full, permission denied, a name too long) into
    one line: what failed and where. Whatever was being written is a temporary that is never
    published."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as error:
            if error.errno not in _FILE_SYSTEM_ERRORS:
                raise
            raise _Failure(_file_system_failure(error)) from None
        except tracking.TrackingUnavailable as error:
            raise _Failure(str(error)) from None
        except Exception as error:
            if not tracking.unreachable(error):
                raise
            raise _Failure(
                f"MLflow tracking server {tracking.shown_uri()} is unreachable; "
                "try again when it is back"
            ) from None


_FILE_SYSTEM_ERRORS = {
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,  # a path component over the file system's 255 bytes
    errno.ELOOP,
}


def _file_system_failure(error: OSError) -> str:
    """One line for a file-system error: the file it names, or for a full disk the folder that
    was being written (a full artifact store fails on a temporary name nobody knows)."""
    if not error.filename:
        return str(error.strerror or error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        # A copy's error names its source first, its destination second (shutil's sendfile).
        written = error.filename2 or error.filename
        return f"{error.strerror}: nothing more fits in {os.path.dirname(written)}"
    return f"{error.strerror or error}: {error.filename}"


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(package_name="leukemia")
def main():
    """Reproducible acute lymphoblastic leukemia classification, tracked in MLflow."""
    # Downloads here are a model's few files: MLflow's bars would only clutter the output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    processes.interrupt_on_terminate()  # kill or scancel: runs end KILLED, not RUNNING
    processes.stop_when_parent_dies()  # a child of compare/main ends with it
    tracking.watch_tracking_server(lambda line: click.echo(line, err=True))


@main.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--per-class",
    type=click.IntRange(min=1),
    default=preprocess_step.SYNTHETIC_PER_CLASS,
    help="Images per class.",
)
@click.option("--seed", type=int, default=0, help="Seed: same seed, same images.")
@click.option(
    "--size",
    type=click.IntRange(32, synthetic.MAX_SIZE),
    default=224,
    help="Image side in pixels.",
)
def synth_command(out, per_class, seed, size):
    """Draw a synthetic smear dataset into OUT (the 3,256-image release's layout)."""
    try:
        path = synthetic.generate(out, per_class=per_class, seed=seed, size=size)
    except (ValueError, FileExistsError) as error:
        raise _Failure(str(error)) from None
    click.echo(f"{4 * per_class} synthetic images in {path}")


def _experiment(config_path, overrides: dict):
    """(TrainConfig, PreprocessConfig) from the YAML and the ``--field VALUE`` overrides."""
    try:
        return load_experiment(config_path, overrides)
    except ValueError as error:
        raise _Failure(str(error)) from None


def _preprocess(*args) -> tuple:
    """``steps.preprocess.run`` with its errors as one-line failures."""
    try:
        return preprocess_step.run(*args)
    except (DatasetError, FileExistsError, ValueError) as error:
        raise _Failure(str(error)) from None


def _stored(processed: str, out_dir, manifest, overrides: dict) -> tuple:
    """``--processed``: the folder's own preprocessing and split; options that would change
    them are refused rather than ignored."""
    given = sorted(set(overrides) & set(PREPROCESS_FIELDS)) + (["manifest"] if manifest else [])
    if given:
        raise _Failure(
            f"--processed {processed} fixes the preprocessing and the split; drop {given} (or "
            "drop --processed to preprocess with them)"
        )
    try:
        return preprocess_step.stored(processed, out_dir), 0.0
    except ValueError as error:
        raise _Failure(f"--processed: {error}") from None


_OVERRIDABLE = {
    "context_settings": {"ignore_unknown_options": True, "allow_extra_args": True},
    "epilog": cli_options.config_fields_help(),
}


@main.command(
    "preprocess",
    context_settings=_OVERRIDABLE["context_settings"],
    epilog=cli_options.config_fields_help(train=False),
)
@cli_options.preprocess_options
@cli_options.config_path_option("whose preprocessing fields (preprocess block) to use")
@click.option(
    "--out-dir",
    callback=cli_options.empty_is_none,
    default=None,
    help="Output store: one immutable folder per option set, `latest` the newest "
    "[default: processed].",
)
@click.option(
    "--manifest",
    callback=cli_options.empty_is_none,
    default=None,
    help="Reuse this manifest.csv's split exactly (same images, same splits).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def preprocess_command(
    ctx,
    data_dir,
    synthetic_per_class,
    synthetic_seed,
    config_path,
    out_dir,
    manifest,
    as_json,
    experiment,
    workers,
):
    """Audit, split and segment a dataset; log it to MLflow. Cached by input and options.

    Preprocessing fields are given as --field VALUE (e.g. --kernel-size 9 --segment false)."""
    overrides = cli_options.parse_overrides(ctx.args)
    training = sorted(set(overrides) & set(TRAIN_FIELDS))
    if training:
        raise _Failure(f"preprocess takes preprocessing fields only, got {training}")
    _, pre = _experiment(config_path, overrides)
    data_dir = preprocess_step.resolve_data_dir(data_dir, synthetic_per_class, synthetic_seed)
    out_dir = out_dir or preprocess_step.DEFAULT_OUT_DIR
    result, seconds = _preprocess(data_dir, out_dir, manifest, pre, workers)
    run_id = preprocess_step.log(result, seconds, experiment)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "out_dir": str(result.out_dir),
                    "run_id": run_id,
                    "cache_hit": result.cache_hit,
                    "counts": result.counts,
                }
            )
        )
    else:
        click.echo(preprocess_step.summary(result, seconds))
        click.echo(f"MLflow run {run_id}")


@main.command("train", **_OVERRIDABLE)
@cli_options.preprocess_options
@cli_options.config_path_option("of the training and preprocessing settings")
@click.option(
    "--seed",
    type=cli_options.OrConfig(click.IntRange(min=0)),
    default=None,
    help=f"Training seed [default: from --config, else {TrainConfig.seed}].",
)
@click.option(
    "--manifest",
    callback=cli_options.empty_is_none,
    default=None,
    help="Use this manifest.csv's split exactly (e.g. the other arm's), instead of splitting.",
)
@click.option(
    "--out-dir",
    callback=cli_options.empty_is_none,
    default=None,
    help="Preprocessed images go here, one folder per option set [default: processed].",
)
@click.option(
    "--processed",
    callback=cli_options.empty_is_none,
    default=None,
    help="Train on this preprocessed folder (a path, or its name under --out-dir) with its "
    "preprocessing and split, instead of preprocessing: what a study passes its children.",
)
@click.option(
    "--resume",
    callback=cli_options.empty_is_none,
    default=None,
    help="Continue this interrupted train run (its MLflow run id) from its last epoch.",
)
@click.option(
    "--registered-model-name",
    default=DEFAULT_NAME,
    help="Register the trained model as a new version of this name ('' to skip).",
)
@click.pass_context
def train_command(
    ctx,
    registered_model_name,
    data_dir,
    synthetic_per_class,
    synthetic_seed,
    config_path,
    seed,
    manifest,
    out_dir,
    processed,
    resume,
    experiment,
    workers,
):
    """Train the paper's two-phase classifier on one arm, tracked in MLflow.

    Any config field can be overridden as --field VALUE (e.g. --phase1_epochs 5, --segment
    false), which is what `mlflow run -P field=VALUE` passes. The dataset is preprocessed first
    (cached).
    """
    from .model import PretrainedWeightsError
    from .steps import train as train_step

    overrides = cli_options.parse_overrides(ctx.args)
    if seed is not None:
        overrides["seed"] = seed
    config, pre = _experiment(config_path, overrides)
    origin = {"config": config_path, "data_dir": data_dir}
    out_dir = out_dir or preprocess_step.DEFAULT_OUT_DIR
    if processed is not None:
        result, seconds = _stored(processed, out_dir, manifest, overrides)
        origin["data_dir"] = result.params.get("dataset_root", data_dir)
    else:
        data_dir = preprocess_step.resolve_data_dir(data_dir, synthetic_per_class, synthetic_seed)
        result, seconds = _preprocess(data_dir, out_dir, manifest, pre, workers)
    click.echo(preprocess_step.summary(result, seconds))
    try:
        train_step.run_training(
            config,
            result.out_dir,
            segmentation=result.params["segmentation"],
            work_root=preprocess_step.cache_dir() / "runs",
            experiment=experiment,
            resume=resume,
            register_as=registered_model_name or None,
            origin=origin,
            echo=click.echo,
        )
    except (ValueError, PretrainedWeightsError) as error:
        raise _Failure(str(error)) from None


@main.command("compare", **_OVERRIDABLE)
@cli_options.preprocess_options
@cli_options.study_options
@click.pass_context
def compare_command(ctx, data_dir, synthetic_per_class, synthetic_seed, experiment, **options):
    """The paper's Table 8 done properly: baseline vs proposed (and shortcut) arms on one
    manifest and the same seeds, with paired statistics, under one parent run.

    Config fields can be overridden as --field VALUE for both arms."""

    study_args = _study_args(options)
    plan, data_dir = _plan(ctx, study_args, options, data_dir, synthetic_per_class, synthetic_seed)
    with tracking.start_run("compare", experiment) as parent, processes.children_stop_with_me():
        try:
            comparison = compare_step.compare(plan, data_dir, echo=click.echo, **study_args)
        except (DatasetError, FileExistsError, ValueError) as error:
            raise _Failure(str(error)) from None
        click.echo(statistics.format_table(comparison.table, comparison.tests))
    _echo_links(parent, comparison)


def _echo_links(parent, comparison) -> None:
    """Where the answer is in the MLflow UI (`mlflow ui`'s default address)."""
    from . import ui

    experiment = parent.info.experiment_id
    arms = comparison.tests["deep_arms"]
    deep = [run for arm in arms for run in comparison.children[arm].values()]
    curves = ui.view_url(experiment, ui.study_view_key(parent.info.run_id))
    images = ui.view_url(experiment, ui.images_view_key(parent.info.run_id))
    click.echo(
        f"\nparent run {parent.info.run_id}; in the MLflow UI (mlflow ui --backend-store-uri "
        f"{tracking.shown_uri()}):\n"
        f"  the answer (description):  {ui.run_url(experiment, parent.info.run_id)}\n"
        f"  the deep arms compared:    {ui.compare_url(experiment, deep)}\n"
        f"  curves, one per arm:       {curves}\n"
        f"  images, run by run:        {images}"
    )


def _plan(ctx, study_args: dict, options: dict, data_dir, per_class: int, seed: int):
    """The checked study plan and the dataset folder; the preprocessing fields of ``options``
    and ``seeds`` leave their dicts, ``config_path`` and ``workers`` join ``study_args``."""
    study_args["workers"] = options["workers"]
    try:
        plan = compare_step.plan(
            study_args["config_path"],
            study_args.pop("seeds"),
            cli_options.parse_overrides(ctx.args),
            study_args.pop("arms"),
        )
    except ValueError as error:
        raise _Failure(str(error)) from None
    return plan, preprocess_step.resolve_data_dir(data_dir, per_class, seed)


@main.command("main", **_OVERRIDABLE)
@cli_options.preprocess_options
@cli_options.study_options
@click.option("--metric", default=PROMOTION_METRIC, help="Promotion metric.")
@click.option("--min-delta", type=click.FloatRange(min=0), default=0.0, help="Promotion margin.")
@click.pass_context
def main_command(
    ctx, data_dir, synthetic_per_class, synthetic_seed, experiment, metric, min_delta, **options
):
    """The whole study: preprocess, train both arms (and the shortcut arms), compare with
    statistics, register, promote the better deep arm, evaluate the champion.

    With no options: the built-in synthetic data; `--config experiments/demo.yaml` makes it a
    few minutes on a CPU, `--config experiments/paper.yaml --data-dir DATASET` is the paper."""
    study_args = _study_args(options)
    name = study_args["registered_model_name"]
    plan, data_dir = _plan(ctx, study_args, options, data_dir, synthetic_per_class, synthetic_seed)
    with tracking.start_run("main", experiment) as parent, processes.children_stop_with_me():
        try:
            result = main_step.run_study(
                plan, data_dir, metric=metric, min_delta=min_delta, echo=click.echo, **study_args
            )
        except (DatasetError, FileExistsError, ValueError) as error:
            raise _Failure(str(error)) from None
        comparison = result.comparison
        click.echo(statistics.format_table(comparison.table, comparison.tests))
        if result.evaluation is not None:
            cli_models.echo_evaluation(result.evaluation, "test (champion)")
    _echo_links(parent, result.comparison)
    click.echo(
        f"Serve the champion: leukemia serve -m models:/{name}@champion -p 5001\n"
        f"List the versions:  leukemia models --name {name}"
    )


def _study_args(options: dict) -> dict:
    """Take the study options out of ``options`` (the rest are preprocessing options); the
    Slurm resources are the config's ``slurm:`` block with ``--slurm-*`` over it."""
    study = {k: options.pop(k) for k in _STUDY_KEYS}
    try:
        study["slurm"] = slurm.Slurm.from_options(options, study["config_path"])
    except ValueError as error:
        raise _Failure(str(error)) from None
    return study


_STUDY_KEYS = (
    "config_path",
    "seeds",
    "arms",
    "out_dir",
    "env_manager",
    "shortcuts",
    "registered_model_name",
    "executor",
    "jobs",
)

for _command in (
    cli_models.evaluate_command,
    cli_models.promote_command,
    cli_models.models_command,
    cli_models.predict_command,
    cli_models.serve_command,
    cli_search.search_command,
    cli_report.report_command,
):
    main.add_command(_command)
