"""The whole study (``leukemia main``) as the README's quick start runs it, on tiny settings:
both arms as ``mlflow run -e train`` children, shortcut arms, statistics, registry, promotion,
evaluation; then reuse of finished children, ``predict``, and bad input."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from leukemia.cli import main
from leukemia.tracking import git_commit

from .conftest import REPO

TINY = [
    "--config",
    str(REPO / "experiments" / "demo.yaml"),
    "--synthetic-per-class",
    "8",
    "--phase1_epochs",
    "1",
    "--phase2_epochs",
    "2",
]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def venv_on_path(monkeypatch):
    """Children run `leukemia` and `mlflow` by name, as they do in an activated environment."""
    bin_dir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ.get("PATH", ""))


@pytest.mark.slow
def test_main_runs_the_whole_study(tracking_uri, tmp_path, monkeypatch, venv_on_path):
    monkeypatch.chdir(tmp_path)
    result = invoke("main", *TINY, "--experiment", "study")
    assert result.exit_code == 0, result.output
    assert "is now @champion" in result.output and "mlflow ui --backend-store-uri" in result.output
    client = MlflowClient()
    runs = mlflow.search_runs(experiment_names=["study"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("step") == "main"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # The MLflow UI: named runs, the answer in the parent's description, direct links.
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.run_name == "demo study, seeds 42"
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**proposed − baseline: ") and note.splitlines()[0].endswith(".**")
    assert parent.data.tags["best_deep_arm"] in ("baseline", "proposed")
    for row in ("| baseline |", "| proposed |", "| shortcut-rgb |", "| 42 |", "Shortcut floor"):
        assert row in note, note
    link = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/"
    assert link + parent.info.run_id in result.output
    assert "#/compare-runs?runs=" in result.output and "compareRunsMode=CHART" in result.output
    arms = sorted(r.data.tags["arm"] for r in children if r.data.tags.get("step") == "train")
    assert arms == sorted(
        [
            "baseline",
            "proposed",
            "shortcut-rgb",
            "shortcut-gray",
            "shortcut-gray-segmented",
            "shortcut-background",
        ]
    )
    deep = [r for r in children if r.data.tags.get("arm") in ("baseline", "proposed")]
    assert sorted(r.info.run_name for r in deep) == ["baseline seed 42", "proposed seed 42"]
    # Only what means something differs between the arms' params (no paths: the compare
    # view's default plot picks differing params): the images, by the name of the folder the
    # parent built (the child trained on it, no preprocessing of its own), and their options.
    baseline, proposed = sorted(deep, key=lambda r: r.data.tags["arm"])
    keys = set(baseline.data.params) | set(proposed.data.params)
    differ = {k for k in keys if baseline.data.params.get(k) != proposed.data.params.get(k)}
    assert differ and all(k == "processed" or k.startswith("preprocess.") for k in differ), differ
    assert "segment" not in baseline.data.params  # preprocessing is not passed again
    for run in deep:
        assert Path(run.data.tags["data.processed_dir"]).name == run.data.params["processed"]
    assert "viewStateShareKey=images-" + parent.info.run_id in result.output
    assert {r.data.params["data.manifest_hash"] for r in deep} == {
        parent.data.params["data.manifest_hash"]
    }
    assert {r.data.params["config.seed"] for r in deep} == {"42"}
    assert all(r.info.status == "FINISHED" for r in children)
    # Same metric keys on every arm, so the MLflow UI's compare view lines them up.
    for run in children:
        if run.data.tags.get("step") == "train":
            assert {"test_accuracy", "test_f1_macro", "test_f1_weighted"} <= set(run.data.metrics)
    statistics = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/statistics.json")
    seed = statistics["per_seed"]["42"]
    assert 0 <= seed["proposed_vs_baseline"]["p_value"] <= 1
    assert statistics["best_shortcut"].startswith("shortcut")
    # Robustness: every deep arm under every perturbation, its worst case the run's own metric.
    robustness = statistics["robustness"]
    assert robustness["conditions"] == ["darken", "brighten", "noise", "blur", "jpeg30", "stain"]
    assert set(robustness["arms"]) == {"baseline", "proposed"} and not robustness["not_measured"]
    for run in deep:
        worst = robustness["arms"][run.data.tags["arm"]]["worst_per_seed"]["42"]
        assert worst["accuracy"] == pytest.approx(run.data.metrics["robust_worst_accuracy"])
        assert worst["condition"] == run.data.tags["robust_worst_condition"]
    vs = robustness["vs_baseline"]["proposed"]
    assert vs["low"] <= vs["difference"] <= vs["high"]
    assert f"proposed_vs_{statistics['best_shortcut']}" in seed
    table = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/comparison.json")
    assert set(table) == set(arms)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.png", "comparison.csv", "statistics.json"} <= names
    # Registry: one version per deep arm, the better one champion, the evaluation nested.
    versions = client.search_model_versions("name = 'leukemia-classifier'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("leukemia-classifier", "champion")
    assert champion.tags["promotion.decision"] == "promoted"
    (evaluation,) = [r for r in children if r.data.tags.get("step") == "evaluate"]
    assert "robust_jpeg30_accuracy" in evaluation.data.metrics
    assert evaluation.data.tags["model_version"] == f"leukemia-classifier/{champion.version}"
    assert "test_accuracy_ci_low" in evaluation.data.metrics

    # predict with the champion, as a user would after the demo.
    image = next((Path(os.environ["LEUKEMIA_CACHE_DIR"]) / "synthetic").rglob("*.jpg"))
    predicted = invoke("predict", image, "--json")
    assert predicted.exit_code == 0, predicted.output
    answer = json.loads(predicted.output)
    assert answer["label"] in ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
    assert abs(sum(v for k, v in answer.items() if k not in ("image", "label")) - 1) < 1e-4
    served = ["label", "prob_benign", "prob_early_pre_b", "prob_pre_b", "prob_pro_b"]
    assert list(answer) == ["image", *served]  # the served model's column names

    # evaluate with no --manifest scores the champion on its own training data, and says so;
    # another dataset's manifest is named as such; no interval is ever printed as NaN.
    quick = ("--no-robustness", "--gradcam-per-class", "0")
    own = invoke("evaluate", "--bootstrap", "0", *quick)
    assert own.exit_code == 0, own.output
    assert "the model's own training manifest" in own.output
    assert "(no interval: --bootstrap 0)" in own.output and "nan" not in own.output.lower()
    other = invoke("preprocess", "--synthetic-per-class", "8", "--synthetic-seed", "5", "--json")
    other_manifest = Path(json.loads(other.output.splitlines()[-1])["out_dir"]) / "manifest.csv"
    foreign = invoke("evaluate", "--manifest", other_manifest, "--bootstrap", "50", *quick)
    assert foreign.exit_code == 0, foreign.output
    assert "NOT the model's training data" in foreign.output and "95% bootstrap" in foreign.output
    latest = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.step = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    assert latest[0].data.tags["evaluate.data"].startswith("NOT the model's training data")

    # The report, from the runs: the parent's arms, its manifest, the champion's robustness.
    written = invoke("report", parent.info.run_id, "--out-dir", tmp_path / "report")
    assert written.exit_code == 0, written.output
    report = (tmp_path / "report" / "report.md").read_text()
    assert parent.info.run_id in report and parent.data.params["data.manifest_hash"][:16] in report
    assert "| proposed − baseline |" in report and "| shortcut-rgb | 1 |" in report
    assert f"(version {champion.version}, run `{champion.run_id}`" in report
    assert "| jpeg30 |" in report
    assert "| arm | darken | brighten | noise | blur | jpeg30 | stain | robust |" in report
    assert "proposed − baseline, robust accuracy: **" in report
    assert (tmp_path / "report" / f"{parent.info.run_id[:8]}-differences.png").stat().st_size

    # The registry, as `leukemia models` lists it.
    listed = invoke("models")
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split()[:4] == ["version", "aliases", "arm", "preprocessing"]
    assert any("@champion" in line for line in lines[1:]) and len(lines) == 3

    # compare again: the finished children are reused, not retrained (clean checkouts only:
    # uncommitted code proves nothing about what an old run ran).
    if git_commit(REPO).endswith("+dirty"):
        pytest.skip("uncommitted changes: finished runs are (rightly) not reused")
    again = invoke("compare", *TINY, "--experiment", "study", "--shortcuts", "false")
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing finished run") == 2

    # Another kernel changes what the proposed arm sees: it trains anew; the baseline, which
    # sees the same resized RGB images, is reused; the statistics name kernel 9.
    kernel9 = invoke(
        "compare", *TINY, "--experiment", "study", "--shortcuts", "false", "--kernel-size", "9"
    )
    assert kernel9.exit_code == 0, kernel9.output
    assert "baseline seed 42: reusing finished run" in kernel9.output
    assert "proposed seed 42: mlflow run -e train" in kernel9.output
    latest = mlflow.search_runs(
        experiment_names=["study"],
        filter_string="tags.step = 'compare'",
        order_by=["start_time DESC"],
        output_format="list",
    )[0]
    statistics = mlflow.artifacts.load_dict(f"runs:/{latest.info.run_id}/statistics.json")
    assert statistics["preprocessing"]["proposed"]["kernel_size"] == "9"
    assert latest.data.params["preprocess.kernel_size"] == "9"

    # The colour-jitter arm is the baseline's images with a training knob on: the same
    # preprocessing (the baseline is reused), its own run with colour_jitter 0.4 in its config.
    jitter = invoke(
        "compare", *TINY, "--experiment", "study", "--shortcuts", "false",
        "--arms", "baseline,colour-jitter",
    )  # fmt: skip
    assert jitter.exit_code == 0, jitter.output
    assert "baseline seed 42: reusing finished run" in jitter.output
    assert "colour-jitter seed 42: mlflow run -e train" in jitter.output
    (run,) = mlflow.search_runs(
        experiment_names=["study"], filter_string="tags.arm = 'colour-jitter'", output_format="list"
    )
    assert run.info.status == "FINISHED" and run.info.run_name == "colour-jitter seed 42"
    assert run.data.params["config.colour_jitter"] == "0.4"
    assert run.data.params["preprocess.segment"] == "False"


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--seeds", ""], "seeds must be comma-separated integers"),
        (["compare", "--seeds", "1,x"], "seeds must be comma-separated integers"),
        (["compare", "--seeds", "1,1"], "seeds must not repeat"),
        (["compare", "--arms", "baseline,nope"], "arms must be distinct deep arms from baseline"),
        (
            ["compare", "--channel", "lab-a"],
            "the proposed arm would train as the lab-a arm; name it lab-a in --arms",
        ),
        (
            ["compare", "--colour-jitter", "0.3"],
            "the baseline arm would train as the colour-jitter arm; name it colour-jitter",
        ),
        (["report", "nope"], "no run 'nope' in sqlite:///"),
        (["compare", "--bogus", "3"], "unknown config key(s) ['bogus']"),
        (["evaluate", "--model-uri", "models:/leukemia-classifier@nope"], "cannot load model"),
        (["predict", "missing.png"], "image file(s) not found"),
        (["promote", "3"], "no registered model 'leukemia-classifier'"),
    ],
)
def test_bad_study_input_is_a_clear_error(tracking_uri, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")
