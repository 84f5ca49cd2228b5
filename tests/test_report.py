"""``compare --arms`` with more deep arms than the paper's two, and ``leukemia report`` over
it: every number in the report recomputed here from the runs' logged predictions."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from leukemia import metrics
from leukemia.data import read_manifest
from leukemia.steps.report import _difference
from leukemia.steps.statistics import logged_predictions

from .test_study import TINY, invoke, venv_on_path  # noqa: F401 - a fixture


@pytest.mark.slow
def test_compare_more_arms_and_report_them(tracking_uri, tmp_path, monkeypatch, venv_on_path):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    # Two children at once: tiny ones are mostly start-up, which overlaps even on 2 cores.
    args = (
        "--seeds",
        "1,2",
        "--arms",
        "baseline,masked-rgb",
        "--experiment",
        "arms",
        "--jobs",
        "2",
    )
    result = invoke("compare", *TINY, *args)
    assert result.exit_code == 0, result.output
    runs = mlflow.search_runs(experiment_names=["arms"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("step") == "compare"]
    assert parent.data.params["compare.arms"] == "baseline,masked-rgb"
    children = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/children.json")
    assert set(children) == {
        "baseline",
        "masked-rgb",
        "shortcut-rgb",
        "shortcut-gray",
        "shortcut-gray-segmented",
        "shortcut-background",
    }
    # The arm's preprocessing reached its runs: masked-rgb keeps the colours inside the mask.
    for seed, run_id in children["masked-rgb"].items():
        run = mlflow.get_run(run_id)
        assert run.data.tags["arm"] == "masked-rgb" and run.data.params["config.seed"] == seed
        assert run.data.params["preprocess.output"] == "masked-rgb"
    statistics = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/statistics.json")
    best = statistics["best_shortcut"]
    assert statistics["pairs"] == [
        "masked-rgb_vs_baseline",
        f"baseline_vs_{best}",
        f"masked-rgb_vs_{best}",
    ]

    # The pooled difference, recomputed from the logged predictions.
    def correct(arm):
        frames = [logged_predictions(r) for r in dict.fromkeys(children[arm].values())]
        return np.array([(f["predicted"] == f["label"]).to_numpy() for f in frames])

    # The unit resampled is the group each test image was held out in, from the manifest.
    first = mlflow.get_run(children["baseline"]["1"])  # the first deep arm's first seed
    manifest = Path(first.data.tags["data.processed_dir"], "manifest.csv")
    group_of = {row["path"]: row["group"] for row in read_manifest(manifest)}
    paths = logged_predictions(first.info.run_id).index
    groups = [group_of[p] for p in paths]
    unit = f"the {len(set(groups))} held-out groups (images, a duplicate group as one)"
    assert statistics["resampled"] == unit
    expected = metrics.pooled_bootstrap_difference(
        correct("masked-rgb"), correct("baseline"), groups=groups
    )
    assert statistics["pooled"]["masked-rgb_vs_baseline"] == pytest.approx(expected)
    mean = correct("masked-rgb").mean() - correct("baseline").mean()
    assert expected["difference"] == pytest.approx(mean)

    # What the split can show: a model right on every test image against the best shortcut.
    short = logged_predictions(next(iter(children[best].values()))).loc[paths]
    perfect = np.ones((1, len(short)), bool)
    room = metrics.pooled_bootstrap_difference(
        perfect, (short["predicted"] == short["label"]).to_numpy(), groups=groups
    )
    assert room["difference"] == pytest.approx(1 - (short["predicted"] == short["label"]).mean())
    assert statistics["headroom"] == pytest.approx(room)

    written = invoke("report", parent.info.run_id, "--out-dir", tmp_path / "out")
    assert written.exit_code == 0, written.output
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"a model right on every test image would be **{_difference(room)}** above {best}" in (
        report
    )
    low, high = expected["low"], expected["high"]
    row = f"**{expected['difference']:+.3f} [{low:+.3f}, {high:+.3f}]**"
    assert "| masked-rgb − baseline |" in report and row in report, report
    assert f"The 95% intervals resample {statistics['resampled']} with these" in report
    # Calibration, from the runs' metrics: temperature and ECE before and after, per deep arm.
    runs = [mlflow.get_run(r).data.metrics for r in children["baseline"].values()]
    ece = np.mean([m["test_ece"] for m in runs]), np.mean([m["test_ece_calibrated"] for m in runs])
    assert f"| {ece[0]:.3f} → {ece[1]:.3f} |" in report, report
    accuracy = correct("baseline").mean(axis=1)
    assert f"| baseline | 2 | {accuracy.mean():.3f} ± {accuracy.std(ddof=1):.3f} |" in report
    assert "No `leukemia-classifier@champion` in this registry" in report  # compare promotes none
    # Robustness: each arm's worst case over the perturbations, paired with the baseline's,
    # recomputed from the runs' per-image predictions under each condition.
    from leukemia.steps.statistics import robustness_predictions

    def correct_under(arm):
        frames = [robustness_predictions(r) for r in children[arm].values()]
        conditions = [c for c in frames[0].columns if c not in ("label", "clean")]
        return np.array([[(f[c] == f["label"]).to_numpy() for c in conditions] for f in frames])

    robust = metrics.pooled_worst_case_difference(
        correct_under("masked-rgb"), correct_under("baseline"), groups=groups
    )
    assert statistics["robustness"]["vs_baseline"]["masked-rgb"] == pytest.approx(robust)
    assert f"masked-rgb − baseline, robust accuracy: **{_difference(robust)}**" in report
    # The record says how the test set was held out, whoever started the runs: no "?".
    assert first.data.params["data.split.group_by"] == "image"
    header = report.split("Test split.")[0]
    assert "?" not in header and "split: group_by image, block_size 24, split_seed 42" in header
    # A second report replaces the first, whole.
    again = invoke("report", parent.info.run_id, "--out-dir", tmp_path / "out")
    assert again.exit_code == 0 and (tmp_path / "out" / "report.md").read_text() == report

    # A child killed after the study (or deleted) leaves its seed out of every arm, said so,
    # instead of a KeyError (issue 23, item 11); the arms stay paired by seed.
    killed = children["masked-rgb"]["2"]
    mlflow.MlflowClient().set_terminated(killed, "KILLED")
    partial = invoke("report", parent.info.run_id, "--out-dir", tmp_path / "partial")
    assert partial.exit_code == 0, partial.output
    text = (tmp_path / "partial" / "report.md").read_text()
    assert f"masked-rgb seed 2 (run {killed}: KILLED)" in text
    assert "baseline seed 2 (another arm has no finished run)" in text
    assert f"| baseline | 1 | {accuracy[0]:.3f} ± 0.000 |" in text, text

    # A study stopped before it wrote children.json: its children are found by their tags,
    # the unfinished ones said, and the header says the study did not finish.
    from urllib.parse import urlparse

    parent_id = parent.info.run_id
    Path(urlparse(mlflow.get_run(parent_id).info.artifact_uri).path, "children.json").unlink()
    mlflow.MlflowClient().set_terminated(parent_id, "KILLED")
    stopped = invoke("report", parent_id, "--out-dir", tmp_path / "stopped")
    assert stopped.exit_code == 0, stopped.output
    text = (tmp_path / "stopped" / "report.md").read_text()
    assert "**the study did not finish** (its parent run is KILLED)" in text, text
    assert f", KILLED ({parent_id[:8]}) |" in text, text  # the summary row says so too
    assert f"masked-rgb seed 2 (run {killed}: KILLED)" in text, text


@pytest.mark.parametrize(
    "logged, message",
    [
        (["not", "a", "mapping"], "is not {arm: {seed: run id}}"),
        ({"baseline": {"one": "0" * 32}}, "a seed is not a whole number"),
        ({"baseline": {"1": "../../etc"}}, "'../../etc' is not a run id"),
    ],
)
def test_a_tampered_children_json_is_one_line(tracking_uri, logged, message):
    from leukemia import record as rec

    mlflow.set_experiment("tampered")
    with mlflow.start_run(tags={rec.STEP: "compare"}) as parent:
        mlflow.log_dict(logged, rec.CHILDREN)
    result = invoke("report", parent.info.run_id)
    assert result.exit_code == 1, result.output
    assert result.output == (
        f"Error: children.json of run {parent.info.run_id} {message}\n"
        if message.startswith("is")
        else f"Error: children.json of run {parent.info.run_id} is not {{arm: {{seed: run id}}}}"
        f": {message}\n"
    )
