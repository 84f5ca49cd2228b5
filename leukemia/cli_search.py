"""``leukemia search``: an Optuna study over preprocessing and learning rates, on the
validation split, tracked in MLflow (``steps.search``)."""

from __future__ import annotations

import os

import click

from .data import DatasetError
from .options import Failure as _Failure
from .options import OrConfig, empty_is_none
from .steps import preprocess as preprocess_step

DEFAULT_SPACE = "experiments/search-demo.yaml"
DEFAULT_STORAGE = "searches/optuna.journal"


def _executor_options(function):
    from .options import executor_options

    options = executor_options(
        "Search workers (one study, one storage)", "1, this process; with slurm, 1 job"
    )
    for option in reversed(options):
        function = option(function)
    return function


@click.command(
    "search", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
)
@click.option(
    "--data-dir",
    default=preprocess_step.SYNTHETIC,
    help="Dataset folder, or 'synthetic' for generated data.",
)
@click.option(
    "--synthetic-per-class", type=click.IntRange(min=1), default=preprocess_step.SYNTHETIC_PER_CLASS
)
@click.option("--synthetic-seed", type=int, default=0)
@click.option(
    "--space",
    default=DEFAULT_SPACE,
    help="Search YAML: base config and dimensions (experiments/search.yaml is the paper's "
    "model, experiments/search-cpu.yaml a laptop's).",
)
@click.option("--n-trials", type=click.IntRange(min=1), default=6, help="Trials this worker runs.")
@click.option(
    "--max-trials",
    type=OrConfig(click.IntRange(min=1)),
    default=None,
    help="Cap on the study's finished (complete or pruned) trials, all workers together.",
)
@click.option(
    "--timeout", type=OrConfig(click.FloatRange(min=1)), default=None, help="Seconds per worker."
)
@click.option(
    "--storage",
    default=DEFAULT_STORAGE,
    help="Optuna storage: a journal file path (several workers on one machine), or an RDB URL "
    "(postgresql://... across machines; sqlite:///... for one worker).",
)
@click.option(
    "--study-name",
    callback=empty_is_none,
    default=None,
    help="Study name [default: the space file's name].",
)
@click.option(
    "--objective",
    type=OrConfig(click.Choice(["f1_macro", "loss"])),
    default=None,
    help="Validation macro F1 (maximised) or loss (minimised) [default: from --space].",
)
@click.option("--out-dir", default=preprocess_step.DEFAULT_OUT_DIR, help="Preprocess store.")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Preprocess processes.")
@click.option("--experiment", default=None, help="MLflow experiment [default: leukemia].")
@click.option(
    "--confirm-seeds",
    type=OrConfig(click.STRING),
    default=None,
    help="Then train the base config and best.yaml with these seeds (e.g. 1,2,3) and compare "
    "them on the test split with paired statistics: the number to report.",
)
@click.option(
    "--env-manager",
    type=click.Choice(["local", "virtualenv", "uv", "conda"]),
    default="local",
    help="How the confirm runs (`mlflow run -e train`) get their environment.",
)
@click.option("--report", "report_only", is_flag=True, help="Only log the study's report.")
@_executor_options
@click.pass_context
def search_command(
    ctx,
    data_dir,
    synthetic_per_class,
    synthetic_seed,
    space,
    n_trials,
    max_trials,
    timeout,
    storage,
    study_name,
    objective,
    out_dir,
    workers,
    experiment,
    confirm_seeds,
    env_manager,
    report_only,
    executor,
    jobs,
    **slurm_options,
):
    """Search preprocessing and training settings with Optuna (TPE, pruning), choosing on the
    validation split only; every trial is a child run of the study's parent run. Several
    workers share one study through --storage and --study-name. Config fields given as
    --FIELD VALUE (e.g. --pretrained weights.safetensors) apply to every trial."""
    import dataclasses
    from pathlib import Path

    import optuna

    from . import search as search_lib
    from .options import parse_overrides
    from .steps import compare as compare_step
    from .steps import confirm as confirm_step
    from .steps import search as search_step

    try:
        seeds = compare_step.parse_seeds(confirm_seeds) if confirm_seeds else None
        loaded = search_lib.load_space(_resolved(space), objective)
        fixed = tuple(sorted(parse_overrides(ctx.args).items()))
        loaded = dataclasses.replace(loaded, overrides=fixed)
        name = search_lib.check_study_name(study_name or Path(space).stem)
        search_lib.check_storage_secret(storage, under_mlflow_run="MLFLOW_RUN_ID" in os.environ)
        search_step.best_config(loaded, {})  # the base and the --FIELD overrides load
        if seeds:
            compare_step.find_project()  # confirm launches `mlflow run -e train`: fail now
        data = None  # a report alone needs no images
        if not report_only or seeds:
            data = preprocess_step.resolve_data_dir(data_dir, synthetic_per_class, synthetic_seed)
        if executor == "slurm" or (jobs or 1) > 1:
            _run_workers(storage, executor, jobs, slurm_options, _resolved(loaded.base))
            report_only = True  # the workers searched; this process reports (and confirms)
        if report_only:
            storage_object = search_lib.open_storage(storage, warn=click.echo)
            try:
                study = optuna.load_study(study_name=name, storage=storage_object)
            except KeyError:
                raise ValueError(
                    f"no study {name!r} in {search_lib.redacted(storage)}; run a search first"
                ) from None
            search_step.report(study, loaded, echo=click.echo)
            search_step.end_parent_if_idle(study)  # what killed workers left running
        else:
            study = search_step.run(
                loaded,
                data,
                storage=storage,
                study_name=name,
                n_trials=n_trials,
                max_trials=max_trials,
                timeout=timeout,
                out_dir=out_dir,
                experiment=experiment,
                workers=workers,
                echo=click.echo,
            )
        if seeds:
            best = Path(search_step.RESULTS_DIR, name, "best.yaml")
            if not best.is_file():
                raise ValueError(f"study {name!r} has no finished trial yet: nothing to confirm")
            result = confirm_step.confirm(
                study.user_attrs[search_step.PARENT_ATTR],
                loaded.base,
                best,
                seeds,
                data,
                out_dir,
                dict(loaded.overrides),
                env_manager,
                jobs=jobs if executor == "local" else None,
                echo=click.echo,
            )
            for seed, entry in result["per_seed"].items():
                difference = entry["accuracy_difference"]
                click.echo(
                    f"seed {seed}: best - base test accuracy {difference['difference']:+.4f} "
                    f"[{difference['low']:+.4f}, {difference['high']:+.4f}], McNemar p = "
                    f"{entry['best_vs_base']['p_value']:.4g}"
                )
    except (ValueError, DatasetError, search_step.StopSearch) as error:
        raise _Failure(str(error)) from None


# Options of the launching command that its workers must not get (they would launch again).
def _launcher_only() -> set[str]:
    from .slurm import Slurm

    slurm = {"--" + name.replace("_", "-") for name in Slurm.OPTIONS}
    return {"--executor", "--jobs", "--confirm-seeds", "--report"} | slurm


def worker_argv(argv: list[str]) -> list[str]:
    """``search`` and its arguments as given (``sys.argv``), less the launcher's options."""
    given = argv[argv.index("search") :]
    launcher = _launcher_only()
    kept, skip = [], False
    for word in given:
        if skip:
            skip = False
            continue
        name = word.split("=", 1)[0]
        if name in launcher:
            skip = "=" not in word and name != "--report"
            continue
        kept.append(word)
    return kept


def _run_workers(storage: str, executor: str, jobs, slurm_options: dict, base_config) -> None:
    """Several workers on one study: processes here, or a Slurm job array (resources: the
    space's base config's ``slurm:`` block with ``--slurm-*`` over it)."""
    import sys

    from . import children, slurm

    count = jobs or 1
    if storage.startswith("sqlite:") and count > 1:
        raise ValueError(
            f"{count} workers cannot share the SQLite storage {storage}; give a journal file "
            "(on a shared file system for Slurm) or a postgresql:// URL"
        )
    settings = slurm.Slurm.from_options(dict(slurm_options), base_config)
    import mlflow

    mlflow.search_experiments(max_results=1)  # the store exists before N workers race on it
    argv = worker_argv(sys.argv)
    click.echo(f"{count} search worker(s) on {executor}: leukemia {' '.join(argv)}")
    try:
        children.run_workers(
            argv,
            count,
            executor=executor,
            slurm=settings,
            echo=click.echo,
        )
    except children.ChildFailed as error:
        raise ValueError(str(error)) from None


def _resolved(path: str) -> str:
    from .config import resolve_config_path

    return str(resolve_config_path(path))
