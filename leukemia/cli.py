"""``leukemia`` command line: each command unpacks its options and calls the library."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from . import images, synthetic
from .data import DatasetError
from .preprocess import PreprocessResult, SplitParams, preprocess
from .segmentation import (
    CHANNELS,
    FOREGROUNDS,
    KERNEL_SHAPES,
    OUTPUTS,
    SegmentationParams,
    check_kernel_size,
)

SYNTHETIC = "synthetic"


def cache_dir() -> Path:
    """Where generated data lives: ``$LEUKEMIA_CACHE_DIR``, else ``~/.cache/leukemia``."""
    base = os.environ.get("LEUKEMIA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "leukemia"
    )
    return Path(base)


def _odd_kernel(ctx, param, value):
    try:
        return check_kernel_size(value)
    except ValueError as error:
        raise click.BadParameter(str(error).replace("kernel_size ", "")) from None


def _fractions(ctx, param, value):
    try:
        return SplitParams(fractions=value).fractions
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


class _Failure(click.ClickException):
    """A one-line error on stderr and exit code 1, for errors found in the data."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="leukemia")
def main():
    """Reproducible acute lymphoblastic leukemia classification, tracked in MLflow."""


@main.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--per-class", type=click.IntRange(min=1), default=60, help="Images per class.")
@click.option("--seed", type=int, default=0, help="Seed: same seed, same images.")
@click.option("--size", type=click.IntRange(min=32), default=224, help="Image side in pixels.")
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
    ``--split-seed`` (``--seed`` seeds training)."""
    if function is None:
        return lambda f: preprocess_options(f, training=training)
    options = [
        click.option(
            "--data-dir",
            default=SYNTHETIC,
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
            type=click.IntRange(min=8),
            default=224,
            help="Images are resized to this square side.",
        ),
        click.option(
            "--channel",
            type=click.Choice(CHANNELS),
            default="gray",
            help="Channel Otsu thresholds: grayscale, HSV saturation or LAB a*.",
        ),
        click.option(
            "--foreground",
            type=click.Choice(FOREGROUNDS),
            default="auto",
            help="Which side of t* is foreground. auto: the stained cells (dark in "
            "gray, bright in saturation and lab-a); 'bright' in gray is the "
            "paper's literal text.",
        ),
        click.option(
            "--kernel-size",
            type=int,
            default=5,
            callback=_odd_kernel,
            help="Side of the closing's structuring element (odd).",
        ),
        click.option(
            "--kernel-shape",
            type=click.Choice(tuple(KERNEL_SHAPES)),
            default="ellipse",
            help="Shape of the structuring element.",
        ),
        click.option(
            "--output",
            type=click.Choice(OUTPUTS),
            default="masked",
            help="masked: gray with background 0; mask: the closed mask as 0/255.",
        ),
        click.option(
            "--split-fractions",
            default="0.7,0.15,0.15",
            callback=_fractions,
            help="train,val,test fractions (sum to 1).",
        ),
        click.option(
            "--split-seed" if training else "--seed",
            "split_seed",
            type=int,
            default=42,
            help="Seed of the split.",
        ),
        click.option(
            "--group-by",
            type=click.Choice(["image", "index-block"]),
            default="image",
            help="image: the paper's split (duplicates still kept together); "
            "index-block: runs of --block-size consecutive file numbers stay "
            "together as pseudo-patients.",
        ),
        click.option(
            "--block-size",
            type=click.IntRange(min=1),
            default=24,
            help="File numbers per pseudo-patient block.",
        ),
        click.option(
            "--near-duplicate-distance",
            type=click.IntRange(0, 64),
            default=4,
            help="Largest dHash Hamming distance (of 64 bits) counted near-duplicate.",
        ),
        click.option(
            "--max-unreadable",
            type=click.FloatRange(0, 1),
            default=0.01,
            help="Fail when more than this fraction of image files is unreadable.",
        ),
        click.option(
            "--max-pixels",
            type=click.IntRange(min=1),
            default=images.DEFAULT_MAX_PIXELS,
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


def _resolve_data_dir(data_dir: str, per_class: int, seed: int) -> str:
    if data_dir != SYNTHETIC:
        return data_dir
    target = cache_dir() / SYNTHETIC / f"per{per_class}-seed{seed}"
    return str(synthetic.generate(target, per_class=per_class, seed=seed))


def _run_preprocess(
    data_dir, out_dir, manifest, options, segment: bool, progress: bool = True
) -> tuple[PreprocessResult, float]:
    seg = SegmentationParams(
        image_size=options["image_size"],
        segment=segment,
        channel=options["channel"],
        foreground=options["foreground"],
        kernel_size=options["kernel_size"],
        kernel_shape=options["kernel_shape"],
        output=options["output"],
    )
    split = SplitParams(
        fractions=options["split_fractions"],
        seed=options["split_seed"],
        group_by=options["group_by"],
        block_size=options["block_size"],
        near_duplicate_distance=options["near_duplicate_distance"],
    )
    start = time.perf_counter()
    try:
        result = preprocess(
            data_dir,
            out_dir,
            seg=seg,
            split=split,
            manifest=manifest,
            max_unreadable=options["max_unreadable"],
            max_pixels=options["max_pixels"],
            workers=options["workers"],
            progress=progress,
        )
    except (DatasetError, FileExistsError, ValueError) as error:
        raise _Failure(str(error)) from None
    return result, time.perf_counter() - start


def _summary(result: PreprocessResult, seconds: float) -> str:
    counts = result.counts
    state = "cached, reused" if result.cache_hit else f"{counts['images'] / seconds:.0f} images/s"
    return (
        f"{counts['images']} images ({counts['train_images']} train, "
        f"{counts['val_images']} val, {counts['test_images']} test; "
        f"{counts['unreadable']} unreadable, {counts['exact_duplicate_groups']} exact and "
        f"{counts['near_duplicate_groups']} near-duplicate groups) -> {result.out_dir} "
        f"[{state}]"
    )


def _empty_is_none(ctx, param, value):
    return value or None


@main.command("preprocess")
@preprocess_options
@click.option(
    "--segment",
    type=click.BOOL,
    is_flag=False,
    default=True,
    help="true: the paper's segmented images (proposed arm); false: the baseline arm.",
)
@click.option(
    "--no-segment",
    is_flag=True,
    help="Same as --segment false: write the resized RGB images (baseline arm).",
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
    segment,
    no_segment,
    out_dir,
    manifest,
    as_json,
    experiment,
    **options,
):
    """Audit, split and segment a dataset; log it to MLflow. Cached by input and options."""
    from . import tracking

    segment = segment and not no_segment
    data_dir = _resolve_data_dir(data_dir, synthetic_per_class, synthetic_seed)
    out_dir = out_dir or _default_out_dir(segment)
    result, seconds = _run_preprocess(data_dir, out_dir, manifest, options, segment)
    with tracking.start_run("preprocess", experiment) as run:
        tracking.log_preprocess(result, seconds)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "out_dir": str(result.out_dir),
                    "run_id": run.info.run_id,
                    "cache_hit": result.cache_hit,
                    "counts": result.counts,
                }
            )
        )
    else:
        click.echo(_summary(result, seconds))
        click.echo(f"MLflow run {run.info.run_id}")


def _default_out_dir(segment: bool) -> str:
    """``processed/segmented`` or ``processed/raw``: one folder per arm, replaced when options
    change (so a changed option never reads stale images, and disks do not fill up)."""
    return os.path.join("processed", "segmented" if segment else "raw")


@main.command("main")
@preprocess_options
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    default="processed",
    help="Parent folder of the two arms' outputs.",
)
def main_command(data_dir, synthetic_per_class, synthetic_seed, out_dir, experiment, **options):
    """The study on one dataset: both arms (segmented, then raw on the identical split).

    Each arm is a child run of one parent run; training and evaluation join as they land.
    """
    from . import tracking

    data_dir = _resolve_data_dir(data_dir, synthetic_per_class, synthetic_seed)
    with tracking.start_run("main", experiment) as parent:
        proposed, seconds = _run_preprocess(
            data_dir, Path(out_dir, "segmented"), None, options, segment=True
        )
        with tracking.start_run("preprocess-proposed", nested=True):
            tracking.log_preprocess(proposed, seconds)
        click.echo("proposed arm: " + _summary(proposed, seconds))
        baseline, seconds = _run_preprocess(
            data_dir, Path(out_dir, "raw"), proposed.manifest, options, segment=False
        )
        with tracking.start_run("preprocess-baseline", nested=True):
            tracking.log_preprocess(baseline, seconds)
        click.echo("baseline arm: " + _summary(baseline, seconds))
    tracking_uri = tracking.mlflow.get_tracking_uri()
    click.echo(
        f"parent run {parent.info.run_id}; look at {proposed.out_dir}/preview.png and "
        f"audit.json, or run: mlflow ui --backend-store-uri {tracking_uri}"
    )


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
@click.option(
    "--segment",
    type=click.BOOL,
    default=True,
    help="true: train on segmented images (proposed arm); false: on raw images (baseline).",
)
@click.option(
    "--config",
    "config_path",
    callback=_empty_is_none,
    default=None,
    help="Experiment YAML (e.g. experiments/paper.yaml) [default: the paper's values in code].",
)
@click.option("--seed", type=int, default=None, help="Training seed (overrides the config's).")
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
@click.pass_context
def train_command(
    ctx,
    data_dir,
    synthetic_per_class,
    synthetic_seed,
    segment,
    config_path,
    seed,
    manifest,
    out_dir,
    resume,
    experiment,
    **options,
):
    """Train the paper's two-phase classifier on one arm, tracked in MLflow.

    Any config field can be overridden as --field VALUE (e.g. --phase1_epochs 5), which is
    what `mlflow run -P field=VALUE` passes. The dataset is preprocessed first (cached).
    """
    from . import workflow
    from .config import load_config
    from .model import PretrainedWeightsError

    overrides = parse_overrides(ctx.args)
    if seed is not None:
        overrides["seed"] = seed
    try:
        config = load_config(config_path, overrides)
    except ValueError as error:
        raise _Failure(str(error)) from None
    data_dir = _resolve_data_dir(data_dir, synthetic_per_class, synthetic_seed)
    out_dir = out_dir or _default_out_dir(segment)
    options["image_size"] = config.image_size
    result, seconds = _run_preprocess(data_dir, out_dir, manifest, options, segment)
    click.echo(_summary(result, seconds))
    try:
        workflow.run_training(
            config,
            result.out_dir,
            segmentation=result.params["segmentation"],
            work_root=cache_dir() / "runs",
            experiment=experiment,
            resume=resume,
            echo=click.echo,
        )
    except (ValueError, PretrainedWeightsError) as error:
        raise _Failure(str(error)) from None


if __name__ == "__main__":
    sys.exit(main())
