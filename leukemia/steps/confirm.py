"""Confirm a search on test: the search's base configuration (the paper's, for
``experiments/search.yaml``) against its ``best.yaml``, trained with the same seeds on the same
split as ``mlflow run -e train`` children of one ``confirm`` run (itself a child of the study's
parent), with paired statistics per seed as ``compare`` computes them. A search value is a
validation number; this is the number to report.

The confirm run logs ``confirm.json`` (per arm and seed test accuracy and macro F1; per seed the
exact McNemar test of best vs base and the paired bootstrap interval of the accuracy
difference), metrics ``best_minus_base_accuracy_seed<N>`` and a description with the table.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from .. import processes, tracking, ui
from .. import record as rec
from ..children import Child, ChildFailed, run_children
from ..config import PREPROCESS_FIELDS, load_experiment, resolve_config_path
from . import compare as compare_step
from . import preprocess as preprocess_step
from .statistics import arm_summary, held_out_groups, logged_predictions, paired

ARMS = ("base", "best")


def confirm(
    parent_id: str,
    base_config,
    best_config,
    seeds: list[int],
    data_dir: str,
    out_dir,
    overrides: dict,
    env_manager: str = "local",
    jobs: int | None = None,
    echo=print,
) -> dict:
    """Train both configs per seed on test (``jobs`` at once) and pair them; returns what
    ``confirm.json`` holds."""
    client = MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    configs = {
        "base": str(resolve_config_path(base_config).resolve()),
        "best": str(Path(best_config).resolve()),
    }
    project = compare_step.find_project()
    processed = _images(configs, data_dir, out_dir, overrides, echo)
    training = {k: v for k, v in overrides.items() if k not in PREPROCESS_FIELDS}
    name = f"confirm on test, seeds {','.join(map(str, seeds))}"
    run_id = tracking.create_child_run(parent_id, name, {rec.STEP: rec.SEARCH_CONFIRM})
    children: dict[str, dict[int, str]] = {arm: {} for arm in ARMS}
    status = "FAILED"
    try:
        wanted = [
            (arm, seed, {**training, "data_dir": data_dir, "config": configs[arm], "seed": seed,
                         "out_dir": str(Path(out_dir).resolve()), "processed": processed[arm],
                         "registered_model_name": ""})
            for seed in seeds
            for arm in ARMS
        ]  # fmt: skip
        echo(f"confirm: {len(wanted)} train runs (mlflow run -e train), {jobs or 1} at once")
        with processes.children_stop_with_me():
            ids = run_children(
                [Child(f"confirm {arm} seed {seed}", p) for arm, seed, p in wanted],
                project=project,
                experiment_id=experiment_id,
                parent_id=run_id,
                env_manager=env_manager,
                jobs=jobs or 1,
                echo=echo,
            )
        for (arm, seed, _), child_id in zip(wanted, ids):
            children[arm][seed] = child_id
        result = _paired(children, seeds)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_dict({"configs": configs, **result}, "confirm.json")
            mlflow.log_metrics(
                {
                    f"best_minus_base_accuracy_seed{seed}": entry["accuracy_difference"][
                        "difference"
                    ]
                    for seed, entry in result["per_seed"].items()
                }
            )
        ui.describe(run_id, _note(result, configs))
        status = "FINISHED"
        return result
    except ChildFailed as error:
        raise ValueError(f"a confirm training failed: {error}") from None
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status)


def _images(configs: dict, data_dir: str, out_dir, overrides: dict, echo) -> dict[str, str]:
    """Each config's images, built here so its children take them (``processed``: the folder's
    name in the ``out_dir`` store), checked to share one split: paired tests need it."""
    preprocessing = {k: v for k, v in overrides.items() if k in PREPROCESS_FIELDS}
    options = {arm: load_experiment(config, preprocessing)[1] for arm, config in configs.items()}
    made = preprocess_step.paired(options, data_dir, out_dir, "configs", echo, prefix="confirm ")
    return {arm: r.out_dir.name for arm, r in made.items()}


def _paired(children: dict, seeds) -> dict:
    table = {
        arm: {
            "runs": {str(s): run for s, run in children[arm].items()},
            **arm_summary(children[arm]),
        }
        for arm in ARMS
    }
    per_seed = {}
    for seed in seeds:
        best = logged_predictions(children["best"][seed])
        base = logged_predictions(children["base"][seed])
        groups, _ = held_out_groups(children["best"][seed], best.index)
        mcnemar, difference = paired(best, base.loc[best.index], seed, groups)
        per_seed[str(seed)] = {"best_vs_base": mcnemar, "accuracy_difference": difference}
    return {"table": table, "per_seed": per_seed}


def _note(result: dict, configs: dict) -> str:
    lines = [
        f"**Confirm on test**: base `{configs['base']}` vs best `{configs['best']}`.",
        "",
        "| config | test accuracy | test F1 macro |",
        "| --- | --- | --- |",
    ]
    for arm, entry in result["table"].items():
        lines.append(
            f"| {arm} | {entry['test_accuracy_mean']:.3f} ± {entry['test_accuracy_sd']:.3f} | "
            f"{entry['test_f1_macro_mean']:.3f} ± {entry['test_f1_macro_sd']:.3f} |"
        )
    lines += ["", "| seed | best − base | 95% interval | McNemar p |", "| --- | --- | --- | --- |"]
    for seed, entry in result["per_seed"].items():
        difference = entry["accuracy_difference"]
        lines.append(
            f"| {seed} | {difference['difference']:+.3f} | [{difference['low']:+.3f}, "
            f"{difference['high']:+.3f}] | {entry['best_vs_base']['p_value']:.3g} |"
        )
    return "\n".join(lines)
