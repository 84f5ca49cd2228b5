"""The command line's shared options: where preprocessing reads from, the study options, and
the ``--field VALUE`` overrides (``-P field=value`` under ``mlflow run``) that set any field of
``TrainConfig`` or ``PreprocessConfig``, the one place each setting is declared."""

from __future__ import annotations

from dataclasses import fields as dataclass_fields

import click

from .arms import DEEP_ARMS, DEFAULT_DEEP_ARMS
from .config import DEFAULT_CONFIG, PAPER_CONFIG, PreprocessConfig, TrainConfig
from .registry import DEFAULT_NAME
from .steps.preprocess import DEFAULT_OUT_DIR, SYNTHETIC, SYNTHETIC_PER_CLASS


class Failure(click.ClickException):
    """A one-line error on stderr and exit code 1, for errors found in the data."""


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


def preprocess_options(function):
    """The options every command that preprocesses shares (preprocess, train, compare, main):
    where the images come from, how many processes, which experiment. What preprocessing does
    is set by ``PreprocessConfig``'s fields, given as ``--field VALUE`` (``config_fields_help``
    lists them)."""
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
            default=SYNTHETIC_PER_CLASS,
            help="Images per class when --data-dir is 'synthetic'.",
        ),
        click.option("--synthetic-seed", type=int, default=0, help="Seed of the synthetic data."),
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
        function = option(function)
    return function


def empty_is_none(ctx, param, value):
    return value or None


def _positive_or_none(ctx, param, value):
    """A count of at least 1, or None for '' (an MLproject parameter left empty)."""
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise click.BadParameter(f"expected a whole number of at least 1, got {value!r}")
    return number


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


def config_fields_help(train: bool = True) -> str:
    """The epilog of the commands that take ``--field VALUE``: every field with its code
    default (the paper's value), preprocessing's with its help."""
    rows = [f"  --{f.name} {f.default!r}" for f in dataclass_fields(TrainConfig)] if train else []
    rows += [
        f"  --{f.name} {f.default!r}: {f.metadata['help']}"
        for f in dataclass_fields(PreprocessConfig)
    ]
    return (
        "Config fields (--field VALUE or --field-name VALUE, or -P field=value under mlflow run; "
        "they override --config, whose values override these defaults, the paper's):\n\n\b\n"
        + "\n".join(rows)
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
        if value != "":  # what MLproject passes for a parameter left unset
            overrides[key.replace("-", "_")] = value
    return overrides


def study_options(function):
    """Options of the commands that run the whole comparison (compare, main)."""
    options = [
        config_path_option("for every arm"),
        click.option(
            "--seeds",
            default=str(TrainConfig.seed),
            help="Comma-separated training seeds; every arm trains once per seed (3+ advised).",
        ),
        click.option(
            "--arms",
            default=",".join(DEFAULT_DEEP_ARMS),
            show_default=True,
            help=f"Comma-separated deep arms, from {', '.join(DEEP_ARMS)} (leukemia/arms.py "
            "says what each trains on). Each other arm is paired with baseline, and every one "
            "with the best shortcut arm.",
        ),
        click.option(
            "--out-dir",
            type=click.Path(file_okay=False),
            default=DEFAULT_OUT_DIR,
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
        *executor_options(
            "Train runs",
            "with local, 1 on a CPU, one per visible GPU (each pinned to its GPU); with slurm, "
            "the slurm block's max_parallel",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def executor_options(what: str, jobs_default: str) -> list:
    """Where a study's train runs (or search workers) go: this machine, or Slurm jobs."""
    return [
        click.option(
            "--executor",
            type=click.Choice(["local", "slurm"]),
            default="local",
            help=f"local: {what.lower()} on this machine (--jobs at once); slurm: a job array "
            "through submitit, resources from the config's slurm: block or --slurm-*.",
        ),
        click.option(
            "--jobs",
            callback=_positive_or_none,
            default=None,
            help=f"{what} at once [default: {jobs_default}].",
        ),
        click.option(
            "--slurm-partition",
            default=None,
            help="Slurm partition [default: the "
            "config's slurm: block, else the cluster's default].",
        ),
        click.option(
            "--slurm-time",
            type=click.IntRange(min=1),
            default=None,
            help="Time limit per job in minutes [default: 120].",
        ),
        click.option(
            "--slurm-gpus",
            type=click.IntRange(min=0),
            default=None,
            help="GPUs per job [default: 0].",
        ),
        click.option(
            "--slurm-cpus",
            type=click.IntRange(min=1),
            default=None,
            help="CPUs per job [default: 2].",
        ),
        click.option(
            "--slurm-mem-gb",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Memory per job in GB [default: the partition's].",
        ),
    ]
