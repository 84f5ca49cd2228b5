"""The command line's options, declared once: the preprocessing options every preprocessing
command shares (unset by default: ``PreprocessConfig`` decides), the study options, and the
``-P key=value`` overrides ``mlflow run`` passes."""

from __future__ import annotations

from dataclasses import fields as dataclass_fields

import click

from .config import DEFAULT_CONFIG, PAPER_CONFIG, PreprocessConfig, TrainConfig
from .preprocess import SplitParams
from .registry import DEFAULT_NAME
from .segmentation import (
    CHANNELS,
    FOREGROUNDS,
    KERNEL_SHAPES,
    MAX_IMAGE_SIZE,
    OUTPUTS,
    check_kernel_size,
)
from .steps.preprocess import SYNTHETIC


class Failure(click.ClickException):
    """A one-line error on stderr and exit code 1, for errors found in the data."""


def odd_kernel(ctx, param, value):
    if value is None:
        return None
    try:
        return check_kernel_size(value)
    except ValueError as error:
        raise click.BadParameter(str(error).replace("kernel_size ", "")) from None


def fractions(ctx, param, value):
    if value is None:
        return None
    try:
        SplitParams(fractions=value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    return value


class OrConfig(click.ParamType):
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


def config_option(*names: str, field: str, type: click.ParamType, help: str, **kwargs):
    """An option for a ``PreprocessConfig`` field: unset by default, so that the config decides;
    the help shows the dataclass default."""
    default = getattr(PreprocessConfig, field)
    return click.option(
        *names,
        field,
        type=OrConfig(type),
        default=None,
        show_default=False,
        help=f"{help} [default: from --config, else {default}]",
        **kwargs,
    )


def preprocess_options(function=None, *, training: bool = False):
    """The options shared by every command that preprocesses (preprocess, main, train).

    ``training``: the image size comes from the training config. The split's seed is
    ``--split-seed`` everywhere (``--seed`` seeds training). Options of ``PreprocessConfig``
    fields are unset by default: the experiment config (or its defaults) decides."""
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
            type=OrConfig(click.IntRange(8, MAX_IMAGE_SIZE)),
            default=None,
            show_default=False,
            help=f"Images are resized to this square side [default: from --config, else "
            f"{TrainConfig.image_size}].",
        ),
        config_option(
            "--channel",
            field="channel",
            type=click.Choice(CHANNELS),
            help="Channel Otsu thresholds: grayscale, HSV saturation or LAB a*.",
        ),
        config_option(
            "--foreground",
            field="foreground",
            type=click.Choice(FOREGROUNDS),
            help="Which side of t* is foreground. auto: the stained cells (dark in gray, bright "
            "in saturation and lab-a); 'bright' in gray is the paper's literal text.",
        ),
        config_option(
            "--kernel-size",
            field="kernel_size",
            type=click.INT,
            callback=odd_kernel,
            help="Side of the closing's structuring element (odd).",
        ),
        config_option(
            "--kernel-shape",
            field="kernel_shape",
            type=click.Choice(tuple(KERNEL_SHAPES)),
            help="Shape of the structuring element.",
        ),
        config_option(
            "--output",
            field="output",
            type=click.Choice(OUTPUTS),
            help="masked: gray with background 0; mask: the closed mask as 0/255; masked-rgb: "
            "the original colours inside the mask, background 0.",
        ),
        config_option(
            "--split-fractions",
            field="split_fractions",
            type=click.STRING,
            callback=fractions,
            help="train,val,test fractions (sum to 1).",
        ),
        config_option(
            "--split-seed",
            field="split_seed",
            type=click.IntRange(min=0),
            help="Seed of the split.",
        ),
        config_option(
            "--group-by",
            field="group_by",
            type=click.Choice(["image", "index-block"]),
            help="image: the paper's split (duplicates still kept together); index-block: runs "
            "of --block-size consecutive file numbers stay together as pseudo-patients.",
        ),
        config_option(
            "--block-size",
            field="block_size",
            type=click.IntRange(min=1),
            help="File numbers per pseudo-patient block.",
        ),
        config_option(
            "--near-duplicate-distance",
            field="near_duplicate_distance",
            type=click.IntRange(0, 64),
            help="Largest dHash Hamming distance (of 64 bits) counted near-duplicate.",
        ),
        config_option(
            "--max-unreadable",
            field="max_unreadable",
            type=click.FloatRange(0, 1),
            help="Fail when more than this fraction of image files is unreadable.",
        ),
        config_option(
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


def segment_option(help: str):
    return config_option("--segment", field="segment", type=click.BOOL, help=help)


PREPROCESS_FIELDS = tuple(f.name for f in dataclass_fields(PreprocessConfig))


def empty_is_none(ctx, param, value):
    return value or None


def _default_config(ctx, param, value):
    return value or DEFAULT_CONFIG


def config_path_option(what: str):
    """``--config``: the experiment YAML; unset or empty ('' from MLproject) is the demo."""
    return click.option(
        "--config",
        "config_path",
        callback=_default_config,
        default=DEFAULT_CONFIG,
        help=f"Experiment YAML {what}; {PAPER_CONFIG} is the paper's recipe.",
    )


def config_fields_help() -> str:
    """The epilog of the commands that take ``--FIELD VALUE`` overrides: every ``TrainConfig``
    field with its code default (the paper's value)."""
    rows = [f"  --{f.name} {f.default!r}" for f in dataclass_fields(TrainConfig)]
    return (
        "Config fields (--FIELD VALUE, or -P FIELD=VALUE under mlflow run; they override "
        "--config, whose values override these defaults, the paper's):\n\n\b\n" + "\n".join(rows)
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


def study_options(function):
    """Options of the commands that run the whole comparison (compare, main)."""
    options = [
        config_path_option("for every arm"),
        click.option(
            "--seeds",
            default="42",
            help="Comma-separated training seeds; every arm trains once per seed (3+ advised).",
        ),
        click.option(
            "--arms",
            default="baseline,proposed",
            show_default=True,
            help="Comma-separated deep arms: baseline (raw RGB), proposed (gray Otsu + closing), "
            "lab-a (Otsu on LAB a), masked-rgb (stain colour inside the mask). Each other arm "
            "is paired with baseline, and every one with the best shortcut arm.",
        ),
        click.option(
            "--out-dir",
            type=click.Path(file_okay=False),
            default="processed",
            help="Store of every arm's preprocessed images (one folder per option set).",
        ),
        click.option(
            "--env-manager",
            type=click.Choice(["local", "virtualenv", "uv", "conda"]),
            default="local",
            help="How the child `mlflow run -e train` runs get their environment.",
        ),
        click.option(
            "--shortcuts",
            type=click.BOOL,
            default=True,
            help="true: also fit the colour/brightness shortcut arms (the floor a deep arm "
            "must beat); false: skip them.",
        ),
        click.option(
            "--registered-model-name",
            default=DEFAULT_NAME,
            help="Each trained arm registers a version of this model.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function
