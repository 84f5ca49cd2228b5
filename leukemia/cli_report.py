"""``leukemia report``: the study's tables and figures from its runs (``steps.report``)."""

from __future__ import annotations

import click
from mlflow.exceptions import MlflowException

from .metrics import N_RESAMPLES
from .options import DEFAULT_NAME
from .options import Failure as _Failure
from .steps import report as report_step


@click.command("report")
@click.argument("run_ids", nargs=-1, required=True)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    default="reports",
    show_default=True,
    help="Folder for report.md and its figures (report.md is replaced).",
)
@click.option(
    "--registered-model-name",
    default=DEFAULT_NAME,
    show_default=True,
    help="The model whose @champion's robustness table ends the report.",
)
@click.option(
    "--bootstrap",
    type=click.IntRange(min=1),
    default=N_RESAMPLES,
    show_default=True,
    help="Bootstrap resamples for the intervals.",
)
def report_command(run_ids, out_dir, registered_model_name, bootstrap):
    """A markdown report of one or more study parents (compare or main runs): per arm, mean
    and sd over seeds with 95% intervals; every deep arm against baseline and against the best
    shortcut arm, per seed and pooled; data, config, commit, hardware, wall time; the
    champion's robustness. Everything comes from what the runs logged."""
    from . import tracking

    tracking.open_store()
    try:
        path = report_step.write_report(run_ids, out_dir, registered_model_name, bootstrap)
    except (ValueError, MlflowException) as error:
        raise _Failure(str(error).splitlines()[0]) from None
    click.echo(f"wrote {path}")
