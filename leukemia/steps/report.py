"""The ``report`` step: a markdown report of one or more study parents (``compare`` or ``main``
runs), computed from what their runs logged, so nothing in it is typed by hand.

For each parent: where the data came from (split, manifest hash), the config, the code commit,
the hardware and the wall time; per arm, mean and sd over seeds of test accuracy and macro F1
with 95% intervals (``metrics.pooled_bootstrap_ci``: the groups the test images were held out in
resampled, ``statistics.held_out_groups``, every seed's model scored on each); every deep arm
against ``baseline`` and against the best shortcut arm, per seed (difference with its paired
bootstrap interval, exact McNemar p) and pooled over seeds (``statistics.summarise``); each deep
arm's robustness (accuracy per perturbation, worst case, paired against the baseline). Then the
robustness table of the registered model's ``@champion`` from its latest ``evaluate`` run.
Figures: accuracy per arm and seed, and the pooled differences with their intervals.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics as stats
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .. import figures, metrics, registry, tracking
from .. import record as rec
from ..arms import ARMS, by_name
from . import statistics as study_stats

STUDY_STEPS = (rec.COMPARE, rec.MAIN)
# What the report shows of a run's split: its data.split.* params (logged by every train run),
# else the -P values an older `mlflow run` logged under these names.
SPLIT_PARAMS = {
    "group_by": "group_by",
    "block_size": "block_size",
    "split_seed": "seed",
    "split_fractions": "fractions",
}
CONFIG_KEYS = (
    "model",
    "pretrained",
    "image_size",
    "batch_size",
    "phase1_epochs",
    "phase1_lr",
    "phase2_epochs",
    "phase2_lr",
    "unfreeze_last",
    "patience",
)


@dataclass
class Study:
    parent: mlflow.entities.Run
    children: dict[str, dict[int, str]]  # arm -> seed -> run id
    deep_arms: list[str]
    runs: dict[str, mlflow.entities.Run]  # run id -> run
    left_out: list[str] = field(default_factory=list)  # "arm seed N (run id: STATUS)"


def load_study(run_id: str) -> Study:
    """A study parent and its finished child runs; ``ValueError`` when it is not one."""
    client = MlflowClient()
    try:
        parent = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"no run {run_id!r} in {tracking.shown_uri()}") from None
    step = parent.data.tags.get(rec.STEP, "")
    if step not in STUDY_STEPS:
        raise ValueError(
            f"run {run_id} is a {step or 'untagged'} run; expected a compare or main parent"
        )
    try:  # written by compare since the report exists; older parents: found by tags below
        logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/{rec.CHILDREN}")
    except (MlflowException, OSError):
        logged = None
    logged = None if logged is None else _checked_children(logged, run_id)
    ids = {r for by in (logged or {}).values() for r in by.values()}
    query = rec.query(rec.TRAIN, **{"mlflow.parentRunId": run_id})
    found = client.search_runs([parent.info.experiment_id], query)
    reused = parent.data.tags.get(rec.REUSED_RUNS, "")
    runs = {r.info.run_id: r for r in found}
    for i in {*ids, *filter(None, reused.split(","))}:
        with contextlib.suppress(MlflowException):  # deleted for good: left out below
            runs[i] = client.get_run(i)
    status = {i: _state(r) for i, r in runs.items()}
    tagged = runs
    runs = {i: r for i, r in runs.items() if status[i] == "FINISHED"}
    if logged is not None:
        children = logged
    else:
        # No children.json: a study stopped before writing it (or an older one). Its children
        # are the runs tagged with it, unfinished ones too, so that the report says what is
        # missing instead of passing for a smaller study; a finished run wins a seed.
        children = {}
        for run in sorted(tagged.values(), key=lambda r: status[r.info.run_id] == "FINISHED"):
            seed = rec.TrainRecord.of(run).seed  # None: a shortcut arm, one run for all seeds
            children.setdefault(run.data.tags.get(rec.ARM, "?"), {})[seed] = run.info.run_id
        seeds = sorted({int(s) for by in children.values() for s in by if s is not None})
        children = {
            arm: dict.fromkeys(seeds, by[None])
            if None in by
            else {int(s): r for s, r in by.items()}
            for arm, by in children.items()
        }
    started = {arm: {str(s) for s in by} for arm, by in children.items()}  # finished or not
    children, left_out = _complete_seeds(children, runs, status)
    named = parent.data.params.get("compare.arms", "")
    planned = parent.data.params.get("compare.seeds", "")
    if logged is None and named and planned:  # seeds the stopped study never started
        for arm in named.split(","):
            left_out += [
                f"{arm} seed {seed} (no run: the study stopped before it)"
                for seed in planned.split(",")
                if seed not in started.get(arm, ())
            ]
    order = named.split(",") if named else [a.name for a in ARMS if a.features is None]
    deep = [arm for arm in order if arm in children]
    if not deep:
        raise ValueError(f"run {run_id} has no finished deep-arm child runs to report")
    # Rows in a fixed order: the deep arms as the study named them, then the shortcut arms.
    shortcuts = [a.name for a in ARMS if a.features is not None and a.name in children]
    children = {arm: children[arm] for arm in [*deep, *shortcuts]}
    return Study(parent, children, deep, runs, left_out)


def _state(run) -> str:
    return "DELETED" if run.info.lifecycle_stage == "deleted" else run.info.status


def _checked_children(logged, run_id: str) -> dict[str, dict[int, str]]:
    """``children.json`` as {arm: {seed: run id}}, or one error naming it."""
    expected = f"{rec.CHILDREN} of run {run_id} is not {{arm: {{seed: run id}}}}"
    if not isinstance(logged, dict) or not all(isinstance(by, dict) for by in logged.values()):
        raise ValueError(expected)
    try:
        children = {str(arm): {int(s): r for s, r in by.items()} for arm, by in logged.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{expected}: a seed is not a whole number") from None
    bad = [r for by in children.values() for r in by.values() if not _RUN_ID.fullmatch(str(r))]
    if bad:
        raise ValueError(f"{expected}: {str(bad[0])[:40]!r} is not a run id")
    return children


_RUN_ID = re.compile(r"[0-9a-f]{32}")


def _complete_seeds(children, runs, status) -> tuple[dict, list[str]]:
    """Only the seeds at which every arm's run finished (arms are paired by seed): a killed,
    failed or deleted child leaves its seed out of every arm, said in ``left_out``."""
    finished = {arm: {s: r for s, r in by.items() if r in runs} for arm, by in children.items()}
    finished = {arm: by for arm, by in finished.items() if by}
    seeds = set.intersection(*(set(by) for by in finished.values())) if finished else set()
    left_out = []
    for arm, by in children.items():
        for seed, run_id in by.items():
            if run_id not in runs:
                left_out.append(f"{arm} seed {seed} (run {run_id}: {status.get(run_id, 'GONE')})")
            elif seed not in seeds:
                left_out.append(f"{arm} seed {seed} (another arm has no finished run)")
    kept = {arm: {s: r for s, r in by.items() if s in seeds} for arm, by in finished.items()}
    return {arm: by for arm, by in kept.items() if by}, left_out


def _interval(result: dict) -> str:
    return f"[{result['low']:.3f}, {result['high']:.3f}]"


def _difference(result: dict) -> str:
    return f"{result['difference']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}]"


def _duration(start_ms: int, end_ms: int | None) -> str:
    if not end_ms:
        return "unfinished"
    seconds = int((end_ms - start_ms) / 1000)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _values(runs, key: str, where: str = "params") -> str:
    found = sorted({str(getattr(r.data, where).get(key, "?")) for r in runs})
    return ", ".join(found)


def _calibration_lines(study: Study) -> list[str]:
    """Per deep arm, the test split's ECE and Brier score before and after the temperature
    each run fitted on its validation split (mean over seeds); runs logged before calibration
    existed are left out."""
    rows = []
    for arm in study.deep_arms:
        runs = [study.runs[r].data.metrics for r in study.children[arm].values()]
        keys = ("calibration_temperature", "test_ece", "test_ece_calibrated")
        keys += ("test_brier", "test_brier_calibrated")
        if not runs or any(k not in m for m in runs for k in keys):
            continue
        mean = {k: stats.fmean(m[k] for m in runs) for k in keys}
        rows.append(
            f"| {arm} | {mean['calibration_temperature']:.2f} | {mean['test_ece']:.3f} → "
            f"{mean['test_ece_calibrated']:.3f} | {mean['test_brier']:.3f} → "
            f"{mean['test_brier_calibrated']:.3f} |"
        )
    if not rows:
        return []
    return [
        "",
        "Calibration on the test split, mean over seeds: temperature scaling fitted on the "
        "validation split and stored with each model (the served probabilities are the "
        "calibrated ones; the predicted class is unchanged).",
        "",
        "| arm | temperature | ECE before → after | Brier before → after |",
        "| --- | --- | --- | --- |",
        *rows,
    ]


def _robustness_lines(robustness: dict) -> list[str]:
    """Per deep arm, test accuracy under each perturbation (mean over seeds) and the worst case,
    and each arm's worst case against the baseline's (``statistics.robustness_summary``)."""
    lines = []
    arms, conditions = robustness.get("arms", {}), robustness.get("conditions", [])
    if arms:
        lines += [
            "",
            "Robustness: test accuracy with the raw test images perturbed before the model's "
            "own preprocessing (mean over seeds); robust = each model's worst condition, mean "
            "± sd over seeds.",
            "",
            "| arm | " + " | ".join(conditions) + " | robust |",
            "| --- |" + " --- |" * (len(conditions) + 1),
        ]
        for arm, entry in arms.items():
            cells = [f"{entry['accuracy'][c]:.3f}" for c in conditions]
            robust = f"**{entry['robust_accuracy_mean']:.3f} ± {entry['robust_accuracy_sd']:.3f}**"
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {robust} |")
    for arm, result in robustness.get("vs_baseline", {}).items():
        lines.append(
            f"\n{arm} − baseline, robust accuracy: **{_difference(result)}** (paired bootstrap "
            "95% interval, the worst condition found again in each resample)"
        )
    if robustness.get("not_measured"):
        lines.append(
            f"\nRobustness not measured for {', '.join(robustness['not_measured'])}: runs "
            "logged before train runs scored perturbed test images."
        )
    return lines


def section(
    study: Study, out_dir: Path, n_resamples: int = metrics.N_RESAMPLES
) -> tuple[str, dict]:
    """One parent's markdown section (figures written to ``out_dir``) and its headline row."""
    parent, children = study.parent, study.children
    table, tests = study_stats.summarise(children, study.deep_arms)
    deep_runs = [study.runs[r] for arm in study.deep_arms for r in children[arm].values()]
    groups, _ = study_stats.held_out_groups(
        deep_runs[0].info.run_id,
        study_stats.logged_predictions(deep_runs[0].info.run_id).index,
    )
    first = deep_runs[0].data.params
    shown = {k: first.get(f"data.split.{v}", first.get(k, "?")) for k, v in SPLIT_PARAMS.items()}
    split = ", ".join(f"{k} {v}" for k, v in shown.items())
    tags = deep_runs[0].data.tags
    source = tags.get(rec.DATA_SOURCE) or first.get("data_dir", "?")  # older runs: the -P value
    config_file = parent.data.params.get("compare.config") or tags.get(rec.CONFIG_FILE)
    config_file = config_file or first.get("config", "?")
    name = parent.data.tags.get("mlflow.runName", parent.info.run_id)
    if parent.info.status != "FINISHED":
        name = f"{name}, {parent.info.status}"  # every table that names it says so
    train_minutes = [(r.info.end_time - r.info.start_time) / 60000 for r in deep_runs]
    config = ", ".join(
        f"{k} {first.get(rec.CONFIG + k, first.get(rec.PREPROCESSING + k, '?'))}"
        for k in CONFIG_KEYS
    )
    lines = [
        f"## {name}: {shown['group_by']} split (run {parent.info.run_id[:8]})",
        "",
        f"- parent run `{parent.info.run_id}` (experiment {parent.info.experiment_id}, "
        f"{parent.data.tags.get('step')}), started "
        f"{datetime.fromtimestamp(parent.info.start_time / 1000, timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC, wall time {_duration(parent.info.start_time, parent.info.end_time)}; "
        f"{len(deep_runs)} deep runs, {stats.fmean(train_minutes):.1f} min each on average",
        f"- data: `{source}`, split: {split}; manifest hash "
        f"`{first.get(rec.MANIFEST_HASH, '?')[:16]}`",
        f"- config `{config_file}`: {config}",
        f"- code: commit {_values(deep_runs, rec.GIT_COMMIT)}; torch "
        f"{_values(deep_runs, 'runtime.torch_version')}, timm "
        f"{_values(deep_runs, 'runtime.timm_version')}",
        f"- hardware: {_values(deep_runs, 'runtime.hardware', 'tags')}; device "
        f"{_values(deep_runs, 'runtime.device')}, precision "
        f"{_values(deep_runs, 'runtime.precision')}",
        *(
            [
                f"- **the study did not finish** (its parent run is {parent.info.status}): "
                "these are the runs it finished"
            ]
            if parent.info.status != "FINISHED"
            else []
        ),
        *(
            [f"- left out, so that every arm is compared at the same seeds: {'; '.join(left)}"]
            if (left := study.left_out)
            else []
        ),
        "",
        f"Test split. The 95% intervals resample {tests['resampled']} with these trained "
        "models held fixed: they cover the test sample, not a new training run (the sd over "
        "seeds shows that). Many pairs are tested at once, so a single p near 0.05 says little.",
        "",
        "| arm | seeds | accuracy, mean ± sd | 95% interval | F1 macro, mean ± sd | 95% interval "
        "| accuracy per seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    headline = {}
    for arm, entry in table.items():
        ids = dict.fromkeys(children[arm].values())  # a shortcut arm: one run for every seed
        frames = [study_stats.logged_predictions(r) for r in ids]
        index = frames[0].index
        labels = frames[0]["label"].to_numpy()
        rows = [f.loc[index, "predicted"].to_numpy() for f in frames]
        held = None if groups is None else groups.loc[index].to_numpy()
        ci = {
            m: metrics.pooled_bootstrap_ci(labels, rows, m, n_resamples=n_resamples, groups=held)
            for m in ("accuracy", "f1_macro")
        }
        seeds = len(frames)
        by_seed = sorted(entry["per_seed"].items(), key=lambda kv: int(kv[0]))
        per_seed = ", ".join(f"{v['test_accuracy']:.3f}" for _, v in by_seed)
        per_seed = per_seed if by_name(arm).features is None else "one fit, no seed"
        lines.append(
            f"| {arm} | {seeds} | {entry['test_accuracy_mean']:.3f} ± "
            f"{entry['test_accuracy_sd']:.3f} | {_interval(ci['accuracy'])} | "
            f"{entry['test_f1_macro_mean']:.3f} ± {entry['test_f1_macro_sd']:.3f} | "
            f"{_interval(ci['f1_macro'])} | {per_seed} |"
        )
        headline[arm] = f"{entry['test_accuracy_mean']:.3f} ± {entry['test_accuracy_sd']:.3f}"
    lines += _calibration_lines(study)
    lines += _robustness_lines(tests.get("robustness", {}))
    stem = parent.info.run_id[:8]
    accuracy = {a: [v["test_accuracy"] for v in e["per_seed"].values()] for a, e in table.items()}
    figures.comparison_figure(accuracy, "test_accuracy").savefig(out_dir / f"{stem}-accuracy.png")
    lines += ["", f"![accuracy per arm]({stem}-accuracy.png)"]
    row = {"name": f"{name} ({parent.info.run_id[:8]})", "split": shown["group_by"]}
    row.update(headline)
    if not tests["pooled"]:
        lines += ["", "No pairs: one deep arm and no shortcut arms."]
        return "\n".join(lines), row
    lines += [
        "",
        "Paired differences in test accuracy, A − B (paired bootstrap 95% interval; exact "
        "McNemar p with the discordant counts, A right only / B right only):",
        "",
        "| A − B | " + " | ".join(f"seed {s}" for s in tests["per_seed"]) + " | mean over seeds |",
        "| --- |" + " --- |" * (len(tests["per_seed"]) + 1),
    ]
    for pair, pooled in tests["pooled"].items():
        cells = [
            f"{_difference(e[pair])}, p = {e[pair]['p_value']:.3g} "
            f"({e[pair]['only_a']}/{e[pair]['only_b']})"
            for e in tests["per_seed"].values()
        ]
        lines.append(
            f"| {pair.replace('_vs_', ' − ')} | "
            + " | ".join(cells)
            + f" | **{_difference(pooled)}** |"
        )
    if "headroom" in tests:
        room, best = tests["headroom"], tests["best_shortcut"]
        lines += [
            "",
            f"What this test split can show: a model right on every test image would be "
            f"**{_difference(room)}** above {best}, with the same resampling. An arm beats "
            f"{best} beyond the interval only where its own interval's low end is above 0, and "
            f"no model, however good, gets a low end above {room['low']:+.3f} here.",
        ]
    figures.difference_figure(tests["pooled"]).savefig(out_dir / f"{stem}-differences.png")
    lines += ["", f"![differences]({stem}-differences.png)"]
    return "\n".join(lines), row


def champion_robustness(name: str) -> str:
    """The ``@champion``'s robustness table from its latest evaluate run, or why there is none."""
    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, registry.CHAMPION)
    except MlflowException:
        return f"No `{name}@{registry.CHAMPION}` in this registry: no robustness table."
    query = (
        f"{rec.query(rec.EVALUATE, model_version=f'{name}/{version.version}')} and "
        "attributes.status = 'FINISHED'"
    )
    found = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=query,
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    for run in found:
        try:
            rows = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{rec.ROBUSTNESS}")[
                "conditions"
            ]
        except (MlflowException, OSError, KeyError):
            continue
        keys = [k for k in rows[0] if k != "condition"]
        arm = client.get_run(version.run_id).data.tags.get(rec.ARM, "?")
        data = run.data.tags.get("evaluate.data", "?")
        lines = [
            f"Robustness of `{name}@{registry.CHAMPION}` (version {version.version}, run "
            f"`{version.run_id}`, {arm} arm), from evaluate run `{run.info.run_id}` on {data}:",
            "",
            "| condition | " + " | ".join(keys) + " |",
            "| --- |" + " --- |" * len(keys),
        ]
        for row in rows:
            cells = ["-" if row[k] is None else f"{row[k]:.3f}" for k in keys]
            lines.append(f"| {row['condition']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    return (
        f"`{name}@{registry.CHAMPION}` is version {version.version}, but no finished evaluate run"
        f" of it: run `leukemia evaluate --model-uri models:/{name}@{registry.CHAMPION}`."
    )


def write_report(run_ids, out_dir, model_name: str, n_resamples: int = metrics.N_RESAMPLES) -> Path:
    """``report.md`` (and figures) in ``out_dir`` for the parents ``run_ids``; returns its path."""
    studies = [load_study(r) for r in run_ids]  # every id checked before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, headline = [], []
    for study in studies:
        text, row = section(study, out_dir, n_resamples)
        sections += [text, ""]
        headline.append(row)
    arms = list(dict.fromkeys(a for row in headline for a in row if a not in ("name", "split")))
    lines = [
        "# Study report",
        "",
        f"Generated by `leukemia report {' '.join(run_ids)}` from the runs in "
        f"`{tracking.shown_uri()}`; test accuracy, mean ± sd over seeds.",
        "",
        "| study | split | " + " | ".join(arms) + " |",
        "| --- | --- |" + " --- |" * len(arms),
        *(
            f"| {row['name']} | {row['split']} | "
            + " | ".join(row.get(a, "-") for a in arms)
            + " |"
            for row in headline
        ),
        "",
        *sections,
        "",
        "## Champion",
        "",
        champion_robustness(model_name),
        "",
    ]
    path = out_dir / "report.md"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
