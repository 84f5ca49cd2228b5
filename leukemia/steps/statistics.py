"""The comparison's numbers, from what the child runs logged: a table per arm, paired
statistics per seed, the parent run's artifacts and headline metrics.

The parent logs:

- ``comparison.json`` / ``comparison.csv``: per arm and seed, test accuracy and F1 (macro,
  weighted); per arm, mean and sd;
- ``statistics.json``: each deep arm's preprocessing; for every deep arm vs baseline and vs
  the best shortcut arm, per seed the exact McNemar test and a paired bootstrap interval of the
  accuracy difference, and pooled over seeds the interval of the mean difference;
- ``comparison.png``: test accuracy per arm, a point per seed, mean +/- sd;
- in ``statistics.json`` under ``robustness``: each deep arm's test accuracy under every
  perturbation (mean over seeds) and its worst case ("robust" accuracy) per seed, mean and sd,
  and every deep arm's worst case against the baseline's, pooled over seeds with a paired
  bootstrap interval (``metrics.pooled_worst_case_difference``), from the runs'
  ``evaluation/robustness_predictions.csv``; runs logged before those existed are named as such.
"""

from __future__ import annotations

import io
import statistics as stats
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from .. import figures, metrics, registry
from .. import record as rec
from ..arms import DEFAULT_DEEP_ARMS
from ..data import read_manifest
from ..preprocess import stored_options

HEADLINE = ("test_accuracy", "test_f1_macro", "test_f1_weighted")


def logged_predictions(run_id: str) -> pd.DataFrame:
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{rec.PREDICTIONS}")
    return pd.read_csv(io.StringIO(text)).set_index("path").sort_index()


def held_out_groups(run_id: str, paths: pd.Index) -> tuple[pd.Series | None, str]:
    """The group each of ``paths`` (a train run's test images) was held out in, from the
    manifest the run trained on (its ``group`` column: duplicates, and with ``group_by
    index-block`` whole blocks of file numbers), and the resampling unit in words. None, and
    images as the unit, where that manifest is not on this machine."""
    folder = MlflowClient().get_run(run_id).data.tags.get(rec.PROCESSED_DIR)
    manifest = Path(folder, "manifest.csv") if folder else None
    if manifest is None or not manifest.is_file():
        return None, "test images (the run's manifest is not on this machine, so not its groups)"
    group_of = {row["path"]: row["group"] for row in read_manifest(manifest)}
    if any(path not in group_of for path in paths):
        return None, "test images (the run's manifest does not list every test image)"
    groups = pd.Series([group_of[p] for p in paths], index=paths)
    try:
        split = stored_options(folder, "split")
    except ValueError:
        split = {}
    count = groups.nunique()
    if split.get("group_by") == "index-block":
        unit = (
            f"the {count} held-out groups (blocks of {split.get('block_size')} consecutive file "
            "numbers, with their duplicates)"
        )
    else:
        unit = f"the {count} held-out groups (images, a duplicate group as one)"
    return groups, unit


def paired(
    a: pd.DataFrame, b: pd.DataFrame, seed: int, groups: pd.Series | None = None
) -> tuple[dict, dict]:
    """Two models' predictions on the same test images (``logged_predictions``): the exact
    McNemar test of A vs B and the paired bootstrap interval of accuracy(A) - accuracy(B),
    resampling ``groups`` (``held_out_groups``) where given."""
    if not a.index.equals(b.index):
        raise ValueError("the two models were tested on different images; cannot pair them")
    labels = a["label"].to_numpy()
    predicted_a, predicted_b = a["predicted"].to_numpy(), b["predicted"].to_numpy()
    return (
        metrics.mcnemar_exact(predicted_a == labels, predicted_b == labels),
        metrics.paired_bootstrap_difference(
            labels,
            predicted_a,
            predicted_b,
            seed=seed,
            groups=None if groups is None else groups.loc[a.index].to_numpy(),
        ),
    )


def robustness_predictions(run_id: str) -> pd.DataFrame | None:
    """A train run's predicted class per test image and condition (``path`` index, ``label``,
    one column per condition), or None for a run logged before they were."""
    names = {a.path for a in MlflowClient().list_artifacts(run_id, rec.EVALUATION)}
    if rec.ROBUSTNESS_PREDICTIONS not in names:
        return None
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{rec.ROBUSTNESS_PREDICTIONS}")
    return pd.read_csv(io.StringIO(text)).set_index("path").sort_index()


def robustness_summary(
    children: dict[str, dict[int, str]], deep_arms, seeds, groups: pd.Series | None
) -> dict:
    """Each deep arm's accuracy per perturbation and worst case, and the worst case paired
    against the baseline's (see the module). ``{"conditions", "arms", "vs_baseline",
    "not_measured"}``; an arm any of whose runs lacks the predictions is in ``not_measured``."""
    frames, missing = {}, []
    for arm in deep_arms:
        by_seed = {seed: robustness_predictions(children[arm][seed]) for seed in seeds}
        if any(f is None for f in by_seed.values()):
            missing.append(arm)
        else:
            frames[arm] = by_seed
    summary = {"conditions": [], "arms": {}, "vs_baseline": {}, "not_measured": missing}
    if not frames:
        return summary
    first = next(iter(next(iter(frames.values())).values()))
    index = first.index
    conditions = [c for c in first.columns if c not in ("label", "clean")]
    summary["conditions"] = conditions
    correct = {}
    for arm, by_seed in frames.items():
        if any(not f.index.equals(index) for f in by_seed.values()):
            raise ValueError(f"the {arm} arm's robustness was measured on other test images")
        correct[arm] = np.stack(
            [
                np.stack([(f[c] == f["label"]).to_numpy() for c in conditions])
                for f in by_seed.values()
            ]
        )  # seeds x conditions x images
        accuracy = correct[arm].mean(axis=2)  # seeds x conditions
        worst = accuracy.min(axis=1)
        summary["arms"][arm] = {
            "accuracy": {c: float(accuracy[:, k].mean()) for k, c in enumerate(conditions)},
            "worst_per_seed": {
                str(seed): {
                    "condition": conditions[int(accuracy[i].argmin())],
                    "accuracy": float(worst[i]),
                }
                for i, seed in enumerate(by_seed)
            },
            "robust_accuracy_mean": float(worst.mean()),
            "robust_accuracy_sd": float(worst.std(ddof=1)) if len(worst) > 1 else 0.0,
        }
    held = None if groups is None else groups.loc[index].to_numpy()
    for arm in correct:
        if arm != "baseline" and "baseline" in correct:
            summary["vs_baseline"][arm] = metrics.pooled_worst_case_difference(
                correct[arm], correct["baseline"], groups=held
            )
    return summary


def arm_summary(by_seed: dict) -> dict:
    """One arm's test metrics (``HEADLINE``) per seed, and their mean and sd over seeds (sd 0
    for one seed), from its runs (seed -> run id)."""
    client = MlflowClient()
    rows = {seed: client.get_run(run_id).data.metrics for seed, run_id in by_seed.items()}
    return {
        "per_seed": {str(s): {k: m.get(k) for k in HEADLINE} for s, m in rows.items()},
        **{f"{key}_mean": stats.fmean(m[key] for m in rows.values()) for key in HEADLINE},
        **{
            f"{key}_sd": stats.stdev([m[key] for m in rows.values()]) if len(rows) > 1 else 0.0
            for key in HEADLINE
        },
    }


def summarise(
    children: dict[str, dict[int, str]], deep_arms=DEFAULT_DEEP_ARMS
) -> tuple[dict, dict]:
    """Per-arm table and the paired statistics from finished child runs.

    ``children``: arm -> seed -> run id (shortcut arms have one seed key, reused for all).
    Pairs: every deep arm against ``baseline`` (when it ran) and against the best shortcut arm
    (by mean test accuracy), per seed (exact McNemar, paired bootstrap interval of the accuracy
    difference) and pooled over seeds (``metrics.pooled_bootstrap_difference``).
    """
    client = MlflowClient()
    table = {arm: arm_summary(by_seed) for arm, by_seed in children.items()}
    shortcuts = [arm for arm in children if arm.startswith("shortcut")]
    best_shortcut = max(shortcuts, key=lambda a: table[a]["test_accuracy_mean"], default=None)
    deep_arms = [arm for arm in deep_arms if arm in children]
    seeds = sorted({seed for arm in deep_arms for seed in children[arm]})
    missing = [f"{a} seed {s}" for a in deep_arms for s in seeds if s not in children[a]]
    if missing:
        raise ValueError(
            f"every deep arm needs a finished run for every seed to be paired; missing: "
            f"{', '.join(missing)}"
        )
    # What each deep arm's model saw, as its runs logged it: the statistics name it.
    preprocessing = {
        arm: {
            k.removeprefix("preprocess."): v
            for k, v in client.get_run(children[arm][seeds[0]]).data.params.items()
            if k.startswith("preprocess.")
        }
        for arm in deep_arms
    }
    others = [arm for arm in deep_arms if arm != "baseline"] if "baseline" in deep_arms else []
    pairs = [(arm, "baseline") for arm in others]
    if best_shortcut is not None:
        pairs += [(arm, best_shortcut) for arm in deep_arms]
    predictions = {
        arm: {seed: logged_predictions(children[arm][seed]) for seed in seeds} for arm in deep_arms
    }
    if best_shortcut is not None:
        short = logged_predictions(next(iter(children[best_shortcut].values())))
        predictions[best_shortcut] = dict.fromkeys(seeds, short)
    first = predictions[deep_arms[0]][seeds[0]].index
    groups, unit = held_out_groups(children[deep_arms[0]][seeds[0]], first)
    tests = {
        "resampled": unit,
        "deep_arms": deep_arms,
        "best_shortcut": best_shortcut,
        "preprocessing": preprocessing,
        "pairs": [f"{a}_vs_{b}" for a, b in pairs],
        "per_seed": {},
        "pooled": {},
    }
    for seed in seeds:
        entry = {}
        for a, b in pairs:
            frame_a = predictions[a][seed]
            frame_b = predictions[b][seed].loc[frame_a.index]
            mcnemar, difference = paired(frame_a, frame_b, seed, groups)
            entry[f"{a}_vs_{b}"] = {**mcnemar, **difference}
        tests["per_seed"][str(seed)] = entry
    for a, b in pairs:
        index = predictions[a][seeds[0]].index
        correct = [
            [(f.loc[index, "predicted"] == f.loc[index, "label"]).to_numpy() for f in by.values()]
            for by in (predictions[a], predictions[b])
        ]
        tests["pooled"][f"{a}_vs_{b}"] = metrics.pooled_bootstrap_difference(
            *correct, groups=None if groups is None else groups.loc[index].to_numpy()
        )
    if best_shortcut is not None:
        tests["headroom"] = headroom(predictions[best_shortcut][seeds[0]].loc[first], groups)
    tests["robustness"] = robustness_summary(children, deep_arms, seeds, groups)
    return table, tests


def headroom(shortcut: pd.DataFrame, groups: pd.Series | None = None) -> dict:
    """What this test split can show against the shortcut arm: the pooled interval of a model
    right on every test image minus ``shortcut`` (its ``logged_predictions``), resampling
    ``groups`` where given. Where its low end is near 0, no real model can beat the shortcut
    beyond the interval on this split, however good it is: the split is too small, not (only)
    the models too weak."""
    correct = (shortcut["predicted"] == shortcut["label"]).to_numpy()
    held = None if groups is None else groups.loc[shortcut.index].to_numpy()
    return metrics.pooled_bootstrap_difference(np.ones_like(correct), correct, groups=held)


def log_summary(table: dict, tests: dict) -> None:
    """The parent run's table, statistics, figure and headline metrics."""
    rows = [
        {"arm": arm, "seed": seed, **values}
        for arm, entry in table.items()
        for seed, values in entry["per_seed"].items()
    ]
    mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), "comparison.csv")
    mlflow.log_dict(table, "comparison.json")
    mlflow.log_dict(tests, rec.STATISTICS)
    figure_table = {
        arm: [v["test_accuracy"] for v in entry["per_seed"].values()]
        for arm, entry in table.items()
    }
    mlflow.log_figure(figures.comparison_figure(figure_table, "test_accuracy"), "comparison.png")
    headline = {}
    for arm, entry in table.items():
        key = metrics.slug(arm)
        for metric in HEADLINE:
            headline[f"{key}_{metric}_mean"] = entry[f"{metric}_mean"]
            headline[f"{key}_{metric}_sd"] = entry[f"{metric}_sd"]
    for pair, result in tests["pooled"].items():
        key = metrics.slug(pair)
        headline[f"accuracy_difference_{key}"] = result["difference"]
        headline[f"accuracy_difference_{key}_low"] = result["low"]
        headline[f"accuracy_difference_{key}_high"] = result["high"]
    for seed, entry in tests["per_seed"].items():
        for pair, result in entry.items():
            headline[f"mcnemar_p_{metrics.slug(pair)}_seed{seed}"] = result["p_value"]
    robustness = tests.get("robustness", {})
    for arm, entry in robustness.get("arms", {}).items():
        headline[f"{metrics.slug(arm)}_robust_accuracy_mean"] = entry["robust_accuracy_mean"]
    for arm, result in robustness.get("vs_baseline", {}).items():
        key = f"robust_accuracy_difference_{metrics.slug(arm)}_vs_baseline"
        headline |= {key: result["difference"], f"{key}_low": result["low"]}
        headline[f"{key}_high"] = result["high"]
    mlflow.log_metrics(headline)


def format_table(table: dict, tests: dict) -> str:
    """A plain-text version of the parent's table, for the terminal."""
    lines = [f"{'arm':<26}{'accuracy':>18}{'F1 macro':>18}"]
    for arm, entry in table.items():
        lines.append(
            f"{arm:<26}{entry['test_accuracy_mean']:>10.4f} ± {entry['test_accuracy_sd']:.4f}"
            f"{entry['test_f1_macro_mean']:>10.4f} ± {entry['test_f1_macro_sd']:.4f}"
        )
    for pair, pooled in tests["pooled"].items():
        a, b = pair.split("_vs_")
        p_values = ", ".join(
            f"{entry[pair]['p_value']:.3g}" for entry in tests["per_seed"].values()
        )
        lines.append(
            f"{a} - {b} accuracy, mean over seeds {pooled['difference']:+.4f} "
            f"[{pooled['low']:+.4f}, {pooled['high']:+.4f}]; McNemar p per seed: {p_values}"
        )
    if "headroom" in tests:
        room = tests["headroom"]
        lines.append(
            f"a model right on every test image - {tests['best_shortcut']}: "
            f"{room['difference']:+.4f} [{room['low']:+.4f}, {room['high']:+.4f}] "
            "(the most this test split can show)"
        )
    robustness = tests.get("robustness", {})
    for arm, entry in robustness.get("arms", {}).items():
        worst = ", ".join(
            f"{w['condition']} {w['accuracy']:.4f}" for w in entry["worst_per_seed"].values()
        )
        lines.append(
            f"{arm} robust (worst-case) accuracy {entry['robust_accuracy_mean']:.4f} ± "
            f"{entry['robust_accuracy_sd']:.4f} (per seed: {worst})"
        )
    for arm, result in robustness.get("vs_baseline", {}).items():
        lines.append(
            f"{arm} - baseline robust accuracy, mean over seeds {result['difference']:+.4f} "
            f"[{result['low']:+.4f}, {result['high']:+.4f}]"
        )
    return "\n".join(lines)


def registered_version(run_ids, metric: str = registry.PROMOTION_METRIC) -> str | None:
    """The registered version (number) of the best of ``run_ids`` by ``metric``."""
    client = MlflowClient()
    records = [rec.TrainRecord.of(client.get_run(run_id)) for run_id in run_ids]
    records = [r for r in records if r.registered_version]
    if not records:
        return None
    return max(records, key=lambda r: r.metrics.get(metric, float("-inf"))).version
