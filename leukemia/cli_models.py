"""The model commands: ``evaluate``, ``promote``, ``models``, ``predict`` and ``serve``
(registered on the ``leukemia`` group in ``cli``)."""

from __future__ import annotations

import contextlib
import json
import os

import click

from . import guard
from . import options as cli_options
from .data import DatasetError
from .metrics import N_RESAMPLES
from .options import Failure as _Failure
from .registry import CHAMPION, DEFAULT_NAME, PROMOTION_METRIC, RECALL_TOLERANCE
from .steps import preprocess as preprocess_step


@click.command("promote")
@click.argument(
    "candidate", metavar="[VERSION]", required=False, callback=cli_options.empty_is_none
)
@click.option("--name", default=DEFAULT_NAME, help="Registered model name.")
@click.option("--metric", default=PROMOTION_METRIC, help="Test metric the candidate must beat.")
@click.option(
    "--min-delta",
    type=float,
    default=0.0,
    help="How much better than the champion the candidate must be (>= 0).",
)
@click.option(
    "--recall-tolerance",
    type=float,
    default=RECALL_TOLERANCE,
    help="Largest drop in any class's recall that still allows promotion.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Promote even where a rule says no (other test manifest, not better by --min-delta, "
    "a recall drop); the version records which rules were overridden.",
)
@click.option("--dry-run", is_flag=True, help="Print the decision; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
def promote_command(name, candidate, metric, min_delta, recall_tolerance, force, dry_run, as_json):
    """Move @champion to VERSION (a number or an alias; default @challenger) when it beats the
    champion on the same test manifest without losing any class's recall. The first version
    always wins; `leukemia models` lists the versions."""
    from . import registry, tracking

    tracking.open_store()
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
            f"{decision.champion or 'unset'}: {decision.reason}"
        )


@click.command("models")
@click.option("--name", default=DEFAULT_NAME, help="Registered model name.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version.")
def models_command(name, as_json):
    """List the versions of a registered model, newest first: aliases, arm, preprocessing,
    test metrics, manifest hash, run and creation time."""
    from . import registry, tracking

    tracking.open_store()
    try:
        rows = registry.list_versions(name)
    except ValueError as error:
        raise _Failure(str(error)) from None
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    header = (
        "version",
        "aliases",
        "arm",
        "preprocessing",
        "accuracy",
        "F1 macro",
        "manifest",
        "created",
        "run",
    )
    lines = [header] + [
        (
            row["version"],
            ",".join("@" + a for a in row["aliases"]) or "-",
            row["arm"] or "-",
            row["preprocessing"] or "-",
            row["test_accuracy"] or "-",
            row["test_f1_macro"] or "-",
            (row["manifest_hash"] or "-")[:12],
            row["created"],
            row["run_id"],
        )
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())


@click.command("predict")
@click.argument("image_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--model-uri",
    default=f"models:/{DEFAULT_NAME}@{CHAMPION}",
    help="A served model: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/classifier.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
def predict_command(image_files, model_uri, as_json):
    """Classify image files with a registered or logged model (its own preprocessing)."""
    import pandas as pd

    from . import tracking
    from .inference import IMAGE_COLUMN, InvalidRequest, encode_image_file
    from .steps.evaluate import load_model

    tracking.open_store_for(model_uri)

    missing = [f for f in image_files if not os.path.isfile(f)]
    if missing:
        raise _Failure(f"image file(s) not found: {missing[:3]}")
    try:  # the model's two data files only: nothing that came with the model runs
        model = load_model(model_uri)
    except ValueError as error:
        raise _Failure(str(error)) from None
    frame = pd.DataFrame({IMAGE_COLUMN: [encode_image_file(f) for f in image_files]})
    try:
        output = model.predict(frame)
    except InvalidRequest as error:
        raise _Failure(str(error)) from None
    for path, row in zip(image_files, output.to_dict("records")):
        probabilities = {k: round(v, 6) for k, v in row.items() if k != "label"}
        if as_json:
            click.echo(json.dumps({"image": path, "label": row["label"], **probabilities}))
        else:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in probabilities.items())
            click.echo(f"{path}: {row['label']} ({shown})")


@click.command("evaluate")
@click.option(
    "--model-uri",
    default=f"models:/{DEFAULT_NAME}@{CHAMPION}",
    help="runs:/RUN_ID, models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint folder.",
)
@click.option(
    "--manifest",
    callback=cli_options.empty_is_none,
    default=None,
    help="A manifest.csv written by preprocess/train (its split says which images to use) "
    "[default: the manifest the model trained on, recorded with its run].",
)
@click.option(
    "--data-dir",
    callback=cli_options.empty_is_none,
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
@click.option(
    "--bootstrap", type=click.IntRange(min=0), default=N_RESAMPLES, help="Resamples (0: none)."
)
@click.option("--experiment", default=None, help="MLflow experiment.")
def evaluate_command(
    model_uri, manifest, data_dir, split, robustness, gradcam_per_class, bootstrap, experiment
):
    """Score a model on a split: report, confusion matrix, ROC-AUC, calibration, bootstrap
    intervals, robustness table and Grad-CAM, logged as one MLflow run."""
    from . import tracking

    tracking.open_store()

    from .steps import evaluate as evaluate_step  # torch: imported by the commands that use it

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
    echo_evaluation(result, split)


def echo_evaluation(result: dict, split: str) -> None:
    if result["accuracy_ci"]:
        interval = "[{:.4f}, {:.4f}] (95% bootstrap)".format(*result["accuracy_ci"])
    else:
        interval = f"({result['no_interval']})"
    click.echo(f"data: {result['manifest']}, {result['data']}")
    click.echo(
        f"{split}: {result['n_images']} images, accuracy {result['accuracy']:.4f} "
        f"{interval}, F1 macro {result['f1_macro']:.4f}"
    )
    for row in result.get("robustness") or []:
        if row.get("condition") != "clean":
            click.echo(
                f"  {row['condition']:<9} accuracy {row['accuracy']:.4f} "
                f"(drop {row.get('accuracy_drop', float('nan')):+.4f})"
            )
    click.echo(f"MLflow run {result['run_id']}")


@click.command("serve")
@click.option(
    "-m",
    "--model-uri",
    default=f"models:/{DEFAULT_NAME}@{CHAMPION}",
    help="The model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/classifier, a folder.",
)
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("-p", "--port", type=click.IntRange(1, 65535), default=5001, help="Port.")
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=guard.MAX_BODY_BYTES,
    help="Larger request bodies get HTTP 400 before they are parsed.",
)
@click.option(
    "--max-depth",
    type=click.IntRange(min=4),
    default=guard.MAX_DEPTH,
    help="JSON nested deeper gets HTTP 400 before it is parsed.",
)
def serve_command(model_uri, host, port, max_body_bytes, max_depth):
    """Serve a model as `mlflow models serve --env-manager local` does (same app, same
    /invocations and /ping), behind a guard that answers oversized or deeply nested requests
    with HTTP 400 instead of MLflow's 500. Only a model in leukemia's own format is served:
    a private copy of its data files, whose MLmodel names leukemia.serving as its only loader;
    a folder with code, a pickle or another flavor is refused before MLflow reads it."""
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    from . import tracking
    from .serving import served_copy

    tracking.open_store_for(model_uri)

    with contextlib.ExitStack() as stack:
        try:
            folder = stack.enter_context(served_copy(model_uri))
            model = mlflow.pyfunc.load_model(str(folder))
        except (mlflow.exceptions.MlflowException, OSError, ValueError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise _Failure(f"cannot serve model {model_uri!r}: {first}") from None
        app = guard.RequestGuard(scoring_server.init(model), max_body_bytes, max_depth)
        uvicorn.run(app, host=host, port=port)
