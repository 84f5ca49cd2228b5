"""``leukemia`` command line: each command unpacks its options and calls the library."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import fields as dataclass_fields

import click

from . import processes, synthetic, tracking
from .config import PreprocessConfig, TrainConfig, load_experiment
from .data import DatasetError
from .preprocess import SplitParams
from .segmentation import (
    CHANNELS,
    FOREGROUNDS,
    KERNEL_SHAPES,
    MAX_IMAGE_SIZE,
    OUTPUTS,
    check_kernel_size,
)
from .steps import compare as compare_step
from .steps import evaluate as evaluate_step
from .steps import main as main_step
from .steps import preprocess as preprocess_step
from .steps import statistics


def _odd_kernel(ctx, param, value):
    if value is None:
        return None
    try:
        return check_kernel_size(value)
    except ValueError as error:
        raise click.BadParameter(str(error).replace("kernel_size ", "")) from None


def _fractions(ctx, param, value):
    if value is None:
        return None
    try:
        SplitParams(fractions=value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    return value


class _OrConfig(click.ParamType):
    """A click type whose empty value ("", what MLproject passes by default) means: take the
    value from the experiment config (``--config``), else the dataclass default."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def convert(self, value, param, ctx):
        if value is None or value == "":
            return None
        return self.inner.convert(value, param, ctx)

    def get_metavar(self, param, ctx=None):
        return self.inner.get_metavar(param, ctx) if ctx is not None else None


def _config_option(*names: str, field: str, type: click.ParamType, help: str, **kwargs):
    """An option for a ``PreprocessConfig`` field: unset by default, so that the config decides;
    the help shows the dataclass default."""
    default = getattr(PreprocessConfig, field)
    return click.option(
        *names,
        field,
        type=_OrConfig(type),
        default=None,
        show_default=False,
        help=f"{help} [default: from --config, else {default}]",
        **kwargs,
    )


class _Failure(click.ClickException):
    """A one-line error on stderr and exit code 1, for errors found in the data."""


class _Commands(click.Group):
    """Turns a failing file system (read-only, full, permission denied) into one line: what
    failed and where. Whatever was being written is a temporary that is never published."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as error:
            if error.errno not in _FILE_SYSTEM_ERRORS:
                raise
            where = f": {error.filename}" if error.filename else ""
            raise _Failure(f"{error.strerror or error}{where}") from None
        except tracking.TrackingUnavailable as error:
            raise _Failure(str(error)) from None
        except Exception as error:
            if not tracking.unreachable(error):
                raise
            raise _Failure(
                f"MLflow tracking server {tracking.mlflow.get_tracking_uri()} is unreachable; "
                "try again when it is back"
            ) from None


_FILE_SYSTEM_ERRORS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(package_name="leukemia")
def main():
    """Reproducible acute lymphoblastic leukemia classification, tracked in MLflow."""
    processes.stop_when_parent_dies()  # a child of compare/main ends with it
    tracking.watch_tracking_server(lambda line: click.echo(line, err=True))


@main.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--per-class", type=click.IntRange(min=1), default=60, help="Images per class.")
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


def preprocess_options(function=None, *, training: bool = False):
    """The options shared by every command that preprocesses (preprocess, main, train).

    ``training``: the image size comes from the training config, and the split's seed is
    ``--split-seed`` (``--seed`` seeds training). Options of ``PreprocessConfig`` fields are
    unset by default: the experiment config (or its defaults) decides."""
    if function is None:
        return lambda f: preprocess_options(f, training=training)
    options = [
        click.option(
            "--data-dir",
            default=preprocess_step.SYNTHETIC,
            help="Dataset folder (class folders, or one level above them), or "
            "'synthetic' for generated data.",
        ),
        click.option(
            "--synthetic-per-class",
            type=click.IntRange(min=1),
            default=60,
            help="Images per class when --data-dir is 'synthetic'.",
        ),
        click.option("--synthetic-seed", type=int, default=0, help="Seed of the synthetic data."),
        None
        if training
        else click.option(
            "--image-size",
            type=_OrConfig(click.IntRange(8, MAX_IMAGE_SIZE)),
            default=None,
            show_default=False,
            help=f"Images are resized to this square side [default: from --config, else "
            f"{TrainConfig.image_size}].",
        ),
        _config_option(
            "--channel",
            field="channel",
            type=click.Choice(CHANNELS),
            help="Channel Otsu thresholds: grayscale, HSV saturation or LAB a*.",
        ),
        _config_option(
            "--foreground",
            field="foreground",
            type=click.Choice(FOREGROUNDS),
            help="Which side of t* is foreground. auto: the stained cells (dark in gray, bright "
            "in saturation and lab-a); 'bright' in gray is the paper's literal text.",
        ),
        _config_option(
            "--kernel-size",
            field="kernel_size",
            type=click.INT,
            callback=_odd_kernel,
            help="Side of the closing's structuring element (odd).",
        ),
        _config_option(
            "--kernel-shape",
            field="kernel_shape",
            type=click.Choice(tuple(KERNEL_SHAPES)),
            help="Shape of the structuring element.",
        ),
        _config_option(
            "--output",
            field="output",
            type=click.Choice(OUTPUTS),
            help="masked: gray with background 0; mask: the closed mask as 0/255.",
        ),
        _config_option(
            "--split-fractions",
            field="split_fractions",
            type=click.STRING,
            callback=_fractions,
            help="train,val,test fractions (sum to 1).",
        ),
        _config_option(
            "--split-seed" if training else "--seed",
            field="split_seed",
            type=click.IntRange(min=0),
            help="Seed of the split.",
        ),
        _config_option(
            "--group-by",
            field="group_by",
            type=click.Choice(["image", "index-block"]),
            help="image: the paper's split (duplicates still kept together); index-block: runs "
            "of --block-size consecutive file numbers stay together as pseudo-patients.",
        ),
        _config_option(
            "--block-size",
            field="block_size",
            type=click.IntRange(min=1),
            help="File numbers per pseudo-patient block.",
        ),
        _config_option(
            "--near-duplicate-distance",
            field="near_duplicate_distance",
            type=click.IntRange(0, 64),
            help="Largest dHash Hamming distance (of 64 bits) counted near-duplicate.",
        ),
        _config_option(
            "--max-unreadable",
            field="max_unreadable",
            type=click.FloatRange(0, 1),
            help="Fail when more than this fraction of image files is unreadable.",
        ),
        _config_option(
            "--max-pixels",
            field="max_pixels",
            type=click.IntRange(min=1),
            help="Larger images are skipped as unreadable (decompression bombs).",
        ),
        click.option(
            "--workers", type=click.IntRange(min=0), default=0, help="Processes; 0 uses every core."
        ),
        click.option(
            "--experiment",
            default=None,
            help="MLflow experiment (default: from the environment, else 'leukemia').",
        ),
    ]
    for option in reversed(options):
        if option is not None:
            function = option(function)
    return function


def _segment_option(help: str):
    return _config_option("--segment", field="segment", type=click.BOOL, help=help)


PREPROCESS_FIELDS = tuple(f.name for f in dataclass_fields(PreprocessConfig))


def _experiment(config_path, options: dict, training_overrides: dict | None = None):
    """(TrainConfig, PreprocessConfig) from the YAML and the options given; removes the
    ``PreprocessConfig`` fields from ``options``."""
    given = {k: options.pop(k) for k in PREPROCESS_FIELDS if k in options}
    try:
        return load_experiment(
            config_path, training_overrides, {k: v for k, v in given.items() if v is not None}
        )
    except ValueError as error:
        raise _Failure(str(error)) from None


def _preprocess(*args) -> tuple:
    """``steps.preprocess.run`` with its errors as one-line failures."""
    try:
        return preprocess_step.run(*args)
    except (DatasetError, FileExistsError, ValueError) as error:
        raise _Failure(str(error)) from None


def _empty_is_none(ctx, param, value):
    return value or None


@main.command("preprocess")
@preprocess_options
@_segment_option("true: the paper's segmented images (proposed arm); false: the baseline arm.")
@click.option(
    "--no-segment",
    is_flag=True,
    help="Same as --segment false: write the resized RGB images (baseline arm).",
)
@click.option(
    "--config",
    "config_path",
    callback=_empty_is_none,
    default=None,
    help="Experiment YAML whose preprocess block (and image_size) to use.",
)
@click.option(
    "--out-dir",
    callback=_empty_is_none,
    default=None,
    help="Output folder [default: processed/segmented or processed/raw].",
)
@click.option(
    "--manifest",
    callback=_empty_is_none,
    default=None,
    help="Reuse this manifest.csv's split exactly (same images, same splits).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def preprocess_command(
    data_dir,
    synthetic_per_class,
    synthetic_seed,
    no_segment,
    config_path,
    out_dir,
    manifest,
    as_json,
    experiment,
    image_size,
    workers,
    **options,
):
    """Audit, split and segment a dataset; log it to MLflow. Cached by input and options."""
    if no_segment:
        options["segment"] = False
    config, pre = _experiment(config_path, options)
    data_dir = preprocess_step.resolve_data_dir(data_dir, synthetic_per_class, synthetic_seed)
    out_dir = out_dir or preprocess_step.default_out_dir(pre.segment)
    size = image_size or config.image_size
    result, seconds = _preprocess(data_dir, out_dir, manifest, pre, size, workers)
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


def parse_overrides(args: list[str]) -> dict:
    """``["--phase1_epochs", "2", "--batch-size=4"]`` -> ``{"phase1_epochs": "2", ...}``: the form
    ``mlflow run`` gives undeclared ``-P key=value`` parameters."""
    overrides, rest = {}, list(args)
    while rest:
        token = rest.pop(0)
        if not token.startswith("--") or len(token) < 3:
            raise click.UsageError(f"unexpected argument {token!r}; expected --key value overrides")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if not rest or rest[0].startswith("--"):
                raise click.UsageError(f"override --{key} has no value; expected --{key} VALUE")
            value = rest.pop(0)
        overrides[key.replace("-", "_")] = value
    return overrides


@main.command(
    "train",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@preprocess_options(training=True)
@_segment_option("true: train on segmented images (proposed arm); false: on raw images (baseline).")
@click.option(
    "--config",
    "config_path",
    callback=_empty_is_none,
    default=None,
    help="Experiment YAML (e.g. experiments/paper.yaml) [default: the paper's values in code].",
)
@click.option(
    "--seed",
    type=_OrConfig(click.IntRange(min=0)),
    default=None,
    help=f"Training seed [default: from --config, else {TrainConfig.seed}].",
)
@click.option(
    "--manifest",
    callback=_empty_is_none,
    default=None,
    help="Use this manifest.csv's split exactly (e.g. the other arm's), instead of splitting.",
)
@click.option(
    "--out-dir",
    callback=_empty_is_none,
    default=None,
    help="Preprocessed images go here [default: processed/segmented or processed/raw].",
)
@click.option(
    "--resume",
    callback=_empty_is_none,
    default=None,
    help="Continue this interrupted train run (its MLflow run id) from its last epoch.",
)
@click.option(
    "--registered-model-name",
    default="leukemia-classifier",
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
    resume,
    experiment,
    workers,
    **options,
):
    """Train the paper's two-phase classifier on one arm, tracked in MLflow.

    Any config field can be overridden as --field VALUE (e.g. --phase1_epochs 5), which is
    what `mlflow run -P field=VALUE` passes. The dataset is preprocessed first (cached).
    """
    from .model import PretrainedWeightsError
    from .steps import train as train_step

    overrides = parse_overrides(ctx.args)
    if seed is not None:
        overrides["seed"] = seed
    config, pre = _experiment(config_path, options, overrides)
    data_dir = preprocess_step.resolve_data_dir(data_dir, synthetic_per_class, synthetic_seed)
    out_dir = out_dir or preprocess_step.default_out_dir(pre.segment)
    result, seconds = _preprocess(data_dir, out_dir, manifest, pre, config.image_size, workers)
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
            echo=click.echo,
        )
    except (ValueError, PretrainedWeightsError) as error:
        raise _Failure(str(error)) from None


@main.command("promote")
@click.option("--name", default="leukemia-classifier", help="Registered model name.")
@click.option(
    "--version",
    "candidate",
    callback=_empty_is_none,
    default=None,
    help="Candidate version number or alias [default: @challenger].",
)
@click.option("--metric", default="test_f1_macro", help="Test metric the candidate must beat.")
@click.option(
    "--min-delta",
    type=float,
    default=0.0,
    help="How much better than the champion the candidate must be (>= 0).",
)
@click.option(
    "--recall-tolerance",
    type=float,
    default=0.05,
    help="Largest drop in any class's recall that still allows promotion.",
)
@click.option("--force", is_flag=True, help="Decide even when the test manifests differ.")
@click.option("--dry-run", is_flag=True, help="Print the decision; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
def promote_command(name, candidate, metric, min_delta, recall_tolerance, force, dry_run, as_json):
    """Move the @champion alias to a better candidate (the first version always wins)."""
    from . import registry

    try:
        decision = registry.decide_and_promote(
            name, candidate, metric, min_delta, recall_tolerance, force, dry_run=dry_run
        )
    except ValueError as error:
        raise _Failure(str(error)) from None
    if as_json:
        click.echo(json.dumps({**decision.as_dict(), "dry_run": dry_run}))
        return
    prefix = "dry run, nothing changed: " if dry_run else ""
    verb = "would become" if dry_run else "is now"
    if decision.promote:
        click.echo(
            f"{prefix}{name} version {decision.candidate} {verb} @champion: {decision.reason}"
        )
    else:
        click.echo(
            f"{prefix}{name} version {decision.candidate} not promoted, @champion stays "
            f"{decision.champion}: {decision.reason}"
        )


@main.command("predict")
@click.argument("image_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--model-uri",
    default="models:/leukemia-classifier@champion",
    help="A served model: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/classifier.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
def predict_command(image_files, model_uri, as_json):
    """Classify image files with a registered or logged model (its own preprocessing)."""
    import mlflow
    import pandas as pd

    from .serving import IMAGE_COLUMN, encode_image_file
    from .steps.evaluate import load_bundle

    missing = [f for f in image_files if not os.path.isfile(f)]
    if missing:
        raise _Failure(f"image file(s) not found: {missing[:3]}")
    try:  # the model's two data files only: nothing that came with the model runs
        model = load_bundle(model_uri).served
    except ValueError as error:
        raise _Failure(str(error)) from None
    frame = pd.DataFrame({IMAGE_COLUMN: [encode_image_file(f) for f in image_files]})
    try:
        output = model.predict(frame)
    except mlflow.exceptions.MlflowException as error:
        raise _Failure(error.message) from None
    for path, row in zip(image_files, output.to_dict("records")):
        probabilities = {k[len("prob_") :]: round(v, 6) for k, v in row.items() if k != "label"}
        if as_json:
            click.echo(json.dumps({"image": path, "label": row["label"], **probabilities}))
        else:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in probabilities.items())
            click.echo(f"{path}: {row['label']} ({shown})")


def study_options(function):
    """Options of the commands that run the whole comparison (compare, main)."""
    options = [
        click.option(
            "--config",
            "config_path",
            callback=_empty_is_none,
            default=None,
            help="Experiment YAML for both arms [default: the paper's values in code].",
        ),
        click.option(
            "--seeds",
            default="42",
            help="Comma-separated training seeds; every arm trains once per seed (3+ advised).",
        ),
        click.option(
            "--out-dir",
            type=click.Path(file_okay=False),
            default="processed",
            help="Parent folder of the two arms' preprocessed images.",
        ),
        click.option(
            "--env-manager",
            type=click.Choice(["local", "virtualenv", "uv", "conda"]),
            default="local",
            help="How the child `mlflow run -e train` runs get their environment.",
        ),
        click.option(
            "--shortcuts/--no-shortcuts",
            default=True,
            help="Also fit the colour/brightness shortcut arms.",
        ),
        click.option(
            "--shortcuts-enabled",
            type=click.BOOL,
            default=None,
            help="Same as --shortcuts/--no-shortcuts, as true/false (for MLproject).",
        ),
        click.option(
            "--registered-model-name",
            default="leukemia-classifier",
            help="Each trained arm registers a version of this model.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@main.command(
    "compare", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
)
@preprocess_options(training=True)
@study_options
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
    click.echo(f"parent run {parent.info.run_id}")


def _plan(ctx, study_args: dict, options: dict, data_dir, per_class: int, seed: int):
    """The checked study plan and the dataset folder; the preprocessing fields of ``options``
    and ``seeds`` leave their dicts, ``config_path`` and ``workers`` join ``study_args``."""
    given = {k: options.pop(k) for k in PREPROCESS_FIELDS if k in options}
    study_args["workers"] = options["workers"]
    try:
        plan = compare_step.plan(
            study_args["config_path"],
            study_args.pop("seeds"),
            parse_overrides(ctx.args),
            {k: v for k, v in given.items() if v is not None},
        )
    except ValueError as error:
        raise _Failure(str(error)) from None
    return plan, preprocess_step.resolve_data_dir(data_dir, per_class, seed)


@main.command("evaluate")
@click.option(
    "--model-uri",
    default="models:/leukemia-classifier@champion",
    help="runs:/RUN_ID, models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint folder.",
)
@click.option(
    "--manifest",
    default=os.path.join("processed", "segmented", "latest", "manifest.csv"),
    help="A manifest.csv written by preprocess/train (its split says which images to use).",
)
@click.option(
    "--data-dir",
    callback=_empty_is_none,
    default=None,
    help="Where the manifest's raw images are [default: the dataset it was made from].",
)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test")
@click.option(
    "--robustness/--no-robustness",
    default=True,
    help="Also score darkened, brightened, noisy, blurred and JPEG-30 test images.",
)
@click.option("--gradcam-per-class", type=click.IntRange(min=0), default=2)
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, help="Resamples (0: none).")
@click.option("--experiment", default=None, help="MLflow experiment.")
def evaluate_command(
    model_uri, manifest, data_dir, split, robustness, gradcam_per_class, bootstrap, experiment
):
    """Score a model on a split: report, confusion matrix, ROC-AUC, calibration, bootstrap
    intervals, robustness table and Grad-CAM, logged as one MLflow run."""

    if data_dir == preprocess_step.SYNTHETIC:
        raise _Failure("--data-dir names the raw images of the manifest; omit it for synthetic")
    try:
        result = evaluate_step.run(
            model_uri,
            manifest,
            dataset_root=data_dir,
            split=split,
            robustness=robustness,
            gradcam_per_class=gradcam_per_class,
            bootstrap=bootstrap,
            experiment=experiment,
        )
    except (ValueError, DatasetError) as error:
        raise _Failure(str(error)) from None
    _echo_evaluation(result, split)


def _echo_evaluation(result: dict, split: str) -> None:
    low, high = result["accuracy_ci"] or (float("nan"), float("nan"))
    click.echo(
        f"{split}: {result['n_images']} images, accuracy {result['accuracy']:.4f} "
        f"[{low:.4f}, {high:.4f}], F1 macro {result['f1_macro']:.4f}"
    )
    for row in result.get("robustness") or []:
        if row.get("condition") != "clean":
            click.echo(
                f"  {row['condition']:<9} accuracy {row['accuracy']:.4f} "
                f"(drop {row.get('accuracy_drop', float('nan')):+.4f})"
            )
    click.echo(f"MLflow run {result['run_id']}")


@main.command("main", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@preprocess_options(training=True)
@study_options
@click.option("--metric", default="test_f1_macro", help="Promotion metric.")
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
            _echo_evaluation(result.evaluation, "test (champion)")
    uri = tracking.mlflow.get_tracking_uri()
    click.echo(
        f"\nDone. Parent run {parent.info.run_id} holds the comparison (comparison.png, "
        f"statistics.json).\nLook: mlflow ui --backend-store-uri {uri}\n"
        f"Serve: mlflow models serve -m models:/{name}@champion --env-manager local -p 5001"
    )


def _study_args(options: dict) -> dict:
    """Take the study options out of ``options`` (the rest are preprocessing options)."""
    study_args = {k: options.pop(k) for k in _STUDY_KEYS}
    enabled = options.pop("shortcuts_enabled")
    if enabled is not None:
        study_args["shortcuts"] = enabled
    return study_args


_STUDY_KEYS = (
    "config_path",
    "seeds",
    "out_dir",
    "env_manager",
    "shortcuts",
    "registered_model_name",
)
