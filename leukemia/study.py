"""The comparison the paper made with one run each, done as one reproducible experiment.

``compare`` runs, under one parent run, the baseline (raw images) and proposed (segmented)
arms for every seed as ``mlflow run -e train`` child runs on one identical manifest, plus the
shortcut arms (colour/brightness histograms + logistic regression). A finished child with the
same arm, config, seed, manifest and code version is reused rather than retrained, as mlflow's
multistep example does. The parent logs:

- ``comparison.json`` / ``comparison.csv``: per arm and seed, test accuracy and F1 (macro,
  weighted); per arm, mean and sd;
- ``statistics.json``: per seed, the exact McNemar test of proposed vs baseline and of each
  deep arm vs the best shortcut arm, and a paired bootstrap interval for the accuracy
  difference;
- ``comparison.png``: test accuracy per arm, a point per seed, mean +/- sd.
"""

from __future__ import annotations

import io
import json
import os
import statistics as stats
import sys
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from . import metrics, shortcut, tracking
from .config import TrainConfig
from .data import read_manifest, split_fingerprint

DEEP_ARMS = ("baseline", "proposed")
# Shortcut arms: (arm tag, feature kind, which preprocessed images).
SHORTCUT_ARMS = (
    ("shortcut-rgb", "rgb", "baseline"),
    ("shortcut-gray", "gray", "baseline"),
    ("shortcut-gray-segmented", "gray", "proposed"),
)
HEADLINE = ("test_accuracy", "test_f1_macro", "test_f1_weighted")


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; empty, malformed or repeated seeds are an error."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"seeds must be comma-separated integers like 1,2,3; got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must not repeat, got {text!r}")
    return seeds


def find_project(start: str | os.PathLike | None = None) -> Path:
    """The folder holding ``MLproject``: the working directory (under ``mlflow run``), else the
    checkout the package was installed from."""
    for candidate in (Path(start or os.getcwd()), Path(__file__).resolve().parents[1]):
        if (candidate / "MLproject").is_file():
            return candidate
    raise ValueError(
        "compare launches `mlflow run -e train` children and needs the project checkout "
        "(a folder with MLproject); run it from there"
    )


def _reusable_run(
    experiment_id: str, arm: str, config: TrainConfig, manifest_hash: str, segmentation: dict
):
    """A FINISHED train run of ``arm`` with the same config, preprocessing, manifest and code,
    or None."""
    commit = tracking.git_commit(Path(__file__).parent) or "unknown"
    if commit.endswith("+dirty"):
        return None  # uncommitted code: nothing proves an old run used it
    query = (
        f"tags.step = 'train' and tags.arm = '{arm}' and attributes.status = 'FINISHED' "
        f"and params.`data.manifest_hash` = '{manifest_hash}' "
        f"and params.`runtime.git_commit` = '{commit}'"
    )
    wanted = {f"config.{k}": str(v) for k, v in config.to_dict().items()}
    wanted.update({k: str(v) for k, v in tracking.preprocess_params(segmentation).items()})
    for run in MlflowClient().search_runs([experiment_id], query, order_by=["start_time DESC"]):
        if all(run.data.params.get(k) == v for k, v in wanted.items()):
            return run
    return None


def run_train_child(
    project: Path,
    experiment_id: str,
    parent_id: str,
    parameters: dict,
    env_manager: str,
):
    """``mlflow run <project> -e train`` as a child of ``parent_id``; returns the finished run."""
    if env_manager == "local":
        # The child's `leukemia` command must be this interpreter's, even when its virtual
        # environment was not activated (mlflow runs the entry point through the shell).
        bin_dir = str(Path(sys.executable).parent)
        if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    submitted = mlflow.projects.run(
        str(project),
        entry_point="train",
        parameters={k: str(v) for k, v in parameters.items()},
        env_manager=env_manager,  # a child does not inherit the parent's --env-manager
        experiment_id=experiment_id,
        synchronous=True,
    )
    client = MlflowClient()
    client.set_tag(submitted.run_id, "mlflow.parentRunId", parent_id)
    return client.get_run(submitted.run_id)


def _predictions(run_id: str) -> pd.DataFrame:
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/predictions.csv")
    return pd.read_csv(io.StringIO(text)).set_index("path").sort_index()


def run_shortcut_arm(arm: str, kind: str, processed_dir, parent_id: str) -> str:
    """Fit one shortcut arm and log it as a child run like a deep arm; returns its run id."""
    import mlflow.sklearn

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", shortcut.ShortcutWarning)
        result = shortcut.fit_shortcut(processed_dir, kind=kind)
    tags = {"step": "train", "arm": arm, "mlflow.parentRunId": parent_id}
    with mlflow.start_run(run_name=arm, nested=True, tags=tags) as run:
        mlflow.log_params(
            {
                "shortcut.kind": kind,
                "shortcut.C": result.C,
                "shortcut.features": len(result.feature_names),
                "data.processed_dir": str(Path(processed_dir).resolve()),
                "data.manifest_hash": split_fingerprint(
                    read_manifest(Path(processed_dir, "manifest.csv"))
                ),
            }
        )
        mlflow.log_dict(
            {
                "val_accuracy_by_C": {str(k): v for k, v in result.val_accuracy_by_C.items()},
                "dropped_features": result.dropped_features,
                "warnings": [str(w.message) for w in caught],
            },
            "shortcut.json",
        )
        tracking.log_evaluation(
            # No loss given: the metrics' own mean -log p(true class), as evaluate logs it.
            {"labels": result.test_labels, "probabilities": result.test_probabilities},
            prefix="test_",
            paths=result.test_paths,
            artifact_dir="evaluation",
        )
        mlflow.log_metric("fit_seconds", result.seconds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mlflow.sklearn.log_model(result.pipeline, name="model")
        return run.info.run_id


def summarise(children: dict[str, dict[int, str]]) -> tuple[dict, dict]:
    """Per-arm table and per-seed statistics from finished child runs.

    ``children``: arm -> seed -> run id (shortcut arms have one seed key, reused for all).
    """
    client = MlflowClient()
    table = {}
    for arm, by_seed in children.items():
        rows = {seed: client.get_run(run_id).data.metrics for seed, run_id in by_seed.items()}
        table[arm] = {
            "per_seed": {str(s): {k: m.get(k) for k in HEADLINE} for s, m in rows.items()},
            **{f"{key}_mean": stats.fmean(m[key] for m in rows.values()) for key in HEADLINE},
            **{
                f"{key}_sd": stats.stdev([m[key] for m in rows.values()]) if len(rows) > 1 else 0.0
                for key in HEADLINE
            },
        }
    shortcuts = [arm for arm in children if arm.startswith("shortcut")]
    best_shortcut = max(shortcuts, key=lambda a: table[a]["test_accuracy_mean"], default=None)
    seeds = sorted(children["proposed"])
    # What each deep arm's model saw, as its runs logged it: the statistics name it.
    preprocessing = {
        arm: {
            k.removeprefix("preprocess."): v
            for k, v in client.get_run(children[arm][seeds[0]]).data.params.items()
            if k.startswith("preprocess.")
        }
        for arm in DEEP_ARMS
    }
    tests = {"best_shortcut": best_shortcut, "preprocessing": preprocessing, "per_seed": {}}
    for seed in seeds:
        proposed = _predictions(children["proposed"][seed])
        baseline = _predictions(children["baseline"][seed])
        if not proposed.index.equals(baseline.index):
            raise ValueError("the two arms were tested on different images; cannot pair them")
        labels = proposed["label"].to_numpy()
        entry = {
            "proposed_vs_baseline": metrics.mcnemar_exact(
                proposed["predicted"].to_numpy() == labels,
                baseline["predicted"].to_numpy() == labels,
            ),
            "accuracy_difference": metrics.paired_bootstrap_difference(
                labels,
                proposed["predicted"].to_numpy(),
                baseline["predicted"].to_numpy(),
                seed=seed,
            ),
        }
        if best_shortcut is not None:
            short = _predictions(next(iter(children[best_shortcut].values())))
            short = short.loc[proposed.index]
            for arm, frame in (("proposed", proposed), ("baseline", baseline)):
                entry[f"{arm}_vs_{best_shortcut}"] = metrics.mcnemar_exact(
                    frame["predicted"].to_numpy() == labels,
                    short["predicted"].to_numpy() == labels,
                )
        tests["per_seed"][str(seed)] = entry
    return table, tests


def log_summary(table: dict, tests: dict) -> None:
    """The parent run's table, statistics, figure and headline metrics."""
    rows = [
        {"arm": arm, "seed": seed, **values}
        for arm, entry in table.items()
        for seed, values in entry["per_seed"].items()
    ]
    mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), "comparison.csv")
    mlflow.log_dict(table, "comparison.json")
    mlflow.log_dict(tests, "statistics.json")
    figure_table = {
        arm: [v["test_accuracy"] for v in entry["per_seed"].values()]
        for arm, entry in table.items()
    }
    mlflow.log_figure(metrics.comparison_figure(figure_table, "test_accuracy"), "comparison.png")
    headline = {}
    for arm, entry in table.items():
        key = metrics.slug(arm)
        for metric in HEADLINE:
            headline[f"{key}_{metric}_mean"] = entry[f"{metric}_mean"]
            headline[f"{key}_{metric}_sd"] = entry[f"{metric}_sd"]
    for seed, entry in tests["per_seed"].items():
        headline[f"mcnemar_p_proposed_vs_baseline_seed{seed}"] = entry["proposed_vs_baseline"][
            "p_value"
        ]
        difference = entry["accuracy_difference"]
        headline[f"accuracy_difference_seed{seed}"] = difference["difference"]
        headline[f"accuracy_difference_low_seed{seed}"] = difference["low"]
        headline[f"accuracy_difference_high_seed{seed}"] = difference["high"]
    mlflow.log_metrics(headline)


def format_table(table: dict, tests: dict) -> str:
    """A plain-text version of the parent's table, for the terminal."""
    lines = [f"{'arm':<26}{'accuracy':>18}{'F1 macro':>18}"]
    for arm, entry in table.items():
        lines.append(
            f"{arm:<26}{entry['test_accuracy_mean']:>10.4f} ± {entry['test_accuracy_sd']:.4f}"
            f"{entry['test_f1_macro_mean']:>10.4f} ± {entry['test_f1_macro_sd']:.4f}"
        )
    for seed, entry in tests["per_seed"].items():
        test = entry["proposed_vs_baseline"]
        difference = entry["accuracy_difference"]
        lines.append(
            f"seed {seed}: proposed - baseline accuracy {difference['difference']:+.4f} "
            f"[{difference['low']:+.4f}, {difference['high']:+.4f}], McNemar p = "
            f"{test['p_value']:.4g} ({test['only_a']} vs {test['only_b']} discordant)"
        )
    return "\n".join(lines)


def results_json(table: dict, tests: dict) -> str:
    return json.dumps({"table": table, "statistics": tests}, indent=2)


def registered_version(run_ids, metric: str = "test_f1_macro") -> str | None:
    """The registered version (number) of the best of ``run_ids`` by ``metric``."""
    client = MlflowClient()
    runs = [client.get_run(run_id) for run_id in run_ids]
    runs = [r for r in runs if "registered_version" in r.data.tags]
    if not runs:
        return None
    best = max(runs, key=lambda r: r.data.metrics.get(metric, float("-inf")))
    return best.data.tags["registered_version"].rsplit("/", 1)[1]
