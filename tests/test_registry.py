"""Registry promotion through aliases, on a real SQLite registry with real logged models."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from leukemia import registry, serving
from leukemia.cli import main
from leukemia.model import create_classifier
from leukemia.model_files import ModelSpec
from leukemia.segmentation import SegmentationParams

NAME = "leukemia-classifier"


@pytest.fixture(scope="module")
def tiny_model():
    return create_classifier("test_efficientnet", pretrained="none")


def register(tiny_model, f1: float, recalls=(0.9, 0.9, 0.9, 0.9), manifest="m1", alias=True):
    """A finished run with test metrics and a served model, registered like training does
    (``alias=False``: as by a run killed before it set @challenger)."""
    tags = {"step": "train", "arm": "proposed", "preprocess.segment": "True"}
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_params({"data.manifest_hash": manifest, "runtime.git_commit": "abc"})
        names = ("benign", "early_pre_b", "pre_b", "pro_b")
        mlflow.log_metrics(
            {"test_f1_macro": f1, **{f"test_recall_{n}": r for n, r in zip(names, recalls)}}
        )
        spec = ModelSpec.for_classifier(
            tiny_model,
            model_name="test_efficientnet",
            dropout=0.4,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            segmentation=SegmentationParams(image_size=64),
        )
        info = serving.log_served_model(tiny_model, spec)
    if not alias:
        return mlflow.register_model(info.model_uri, NAME)
    return registry.register_run_model(run.info.run_id, info.model_uri, NAME)


def promote(*args):
    result = CliRunner().invoke(main, ["promote", "--json", *map(str, args)])
    return result, (json.loads(result.output) if result.exit_code == 0 else None)


def champion() -> str:
    return str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)


def test_versions_carry_tags_and_the_newest_is_challenger(tracking_uri, tiny_model):
    first = register(tiny_model, 0.80)
    tags = MlflowClient().get_model_version(NAME, first.version).tags
    assert tags["arm"] == "proposed" and tags["manifest_hash"] == "m1"
    assert tags["test_f1_macro"] == "0.8" and tags["preprocess.segment"] == "True"
    assert tags["run_id"] and tags["git_commit"] == "abc"
    second = register(tiny_model, 0.81)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == str(second.version)


def test_promotion_rules(tracking_uri, tiny_model):
    register(tiny_model, 0.80)
    result, decision = promote()
    assert decision["promote"] and "first" in decision["reason"] and champion() == "1"

    register(tiny_model, 0.805)  # better, but not by min_delta
    result, decision = promote("--min-delta", 0.01)
    assert not decision["promote"] and champion() == "1"
    assert MlflowClient().get_model_version(NAME, "2").tags["promotion.decision"] == (
        "kept champion"
    )

    register(tiny_model, 0.90, recalls=(0.9, 0.7, 0.9, 0.9))  # better, one recall collapses
    result, decision = promote()
    assert not decision["promote"] and "early_pre_b" in decision["reason"]

    register(tiny_model, 0.90)
    result, decision = promote("--dry-run")
    assert decision["promote"] and decision["dry_run"] and champion() == "1"
    result, decision = promote()
    assert decision["promote"] and champion() == "4"
    tags = MlflowClient().get_model_version(NAME, "4").tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.compared_with"] == "1"


def test_promotion_refuses_bad_input_and_changes_nothing(tracking_uri, tiny_model):
    result, _ = promote()
    assert result.exit_code == 1 and "no registered model 'leukemia-classifier'" in result.output
    register(tiny_model, 0.80)
    promote()
    register(tiny_model, 0.95, manifest="m2")
    result, _ = promote()
    assert result.exit_code == 1 and "different manifests" in result.output
    for args, message in (
        (("17",), "has no version or alias '17'"),
        (("nonexistent",), "has no version or alias 'nonexistent'"),
        (("--min-delta", "-0.1"), "min_delta must be a number >= 0"),
        (("--metric", "test_bogus"), "has no metric 'test_bogus'"),
    ):
        result, _ = promote(*args)
        assert result.exit_code == 1 and message in result.output, result.output
    assert champion() == "1"
    assert "promotion.decision" not in MlflowClient().get_model_version(NAME, "2").tags
    result, decision = promote("--force")
    assert decision["promote"] and champion() == "2" and decision["forced"] == ["manifest"]
    assert MlflowClient().get_model_version(NAME, "2").tags["promotion.forced"] == "manifest"


def test_force_overrides_every_rule_and_records_which(tracking_uri, tiny_model):
    register(tiny_model, 0.80)
    promote()
    register(tiny_model, 0.70, recalls=(0.9, 0.5, 0.9, 0.9), manifest="m2")  # worse everywhere
    result, decision = promote("2", "--min-delta", "0.01")
    assert result.exit_code == 1 and "different manifests" in result.output
    result, decision = promote("2", "--force", "--min-delta", "0.01")
    assert decision["promote"] and champion() == "2"
    assert decision["forced"] == ["manifest", "delta", "recall"]
    tags = MlflowClient().get_model_version(NAME, "2").tags
    assert tags["promotion.forced"] == "manifest,delta,recall"
    assert "forced over the manifest rule" in tags["promotion.reason"]
    text = CliRunner().invoke(main, ["promote", "1", "--force"])  # back, in words
    assert "version 1 is now @champion: forced over" in text.output and champion() == "1"


_PROMOTER = """
import sys, time
from pathlib import Path
from leukemia import registry
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
decision = registry.decide_and_promote("leukemia-classifier", sys.argv[1])
print(decision.promote)
"""


@pytest.mark.slow
def test_concurrent_promotions_leave_the_better_model_champion(tracking_uri, tiny_model, tmp_path):
    """Two promotions at once, many times: version 3 beats version 2, whatever the order."""
    import subprocess
    import sys

    for f1 in (0.80, 0.85, 0.90):
        register(tiny_model, f1)
    client = MlflowClient()
    for round_ in range(6):
        client.set_registered_model_alias(NAME, "champion", "1")
        go = tmp_path / f"go-{round_}"
        order = ("3", "2") if round_ % 2 else ("2", "3")
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", _PROMOTER, version, str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for version in order
        ]
        time.sleep(4)  # both imported and waiting
        go.touch()
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr[-2000:]
        assert champion() == "3", f"round {round_}: version {champion()} is champion"
    assert NAME + registry.LOCK_SUFFIX not in {m.name for m in client.search_registered_models()}


def test_a_stale_promotion_lock_is_taken_over(tracking_uri, tiny_model):
    register(tiny_model, 0.80)
    MlflowClient().create_registered_model(NAME + registry.LOCK_SUFFIX)  # a killed promotion's
    with pytest.raises(ValueError, match="holds the lock"):
        with registry.promotion_lock(NAME, wait_s=0.3, stale_s=600):
            pass
    with registry.promotion_lock(NAME, wait_s=10, stale_s=0.5):
        assert registry.promote(registry.decide(NAME)).promote
    assert champion() == "1"
    assert NAME + registry.LOCK_SUFFIX not in {
        m.name for m in MlflowClient().search_registered_models()
    }


def test_a_promotion_that_lost_its_lock_moves_nothing(tracking_uri, tiny_model):
    """Issue 23, item 5: a promotion paused past the stale time after deciding (v2, F1 0.5,
    over v1) loses the lock to a second one (v3, F1 0.9); when it resumes it must not move
    @champion back to the worse version."""
    for f1 in (0.4, 0.5, 0.9):
        register(tiny_model, f1)
    MlflowClient().set_registered_model_alias(NAME, "champion", "1")
    with registry.promotion_lock(NAME) as slow:
        stalled = registry.decide(NAME, "2")
        assert stalled.promote and stalled.champion == "1"
        # ... the slow one pauses; another promotion waits out the stale time and takes over.
        with registry.promotion_lock(NAME, wait_s=10, stale_s=0.3) as fast:
            assert registry.promote(registry.decide(NAME, "3"), lock=fast).promote
        assert champion() == "3"
        with pytest.raises(ValueError, match="lost its lock .* @champion not moved"):
            registry.promote(stalled, lock=slow)
    assert champion() == "3"
    tags = MlflowClient().get_model_version(NAME, "2").tags
    assert "promotion.decision" not in tags  # nothing recorded for the stalled decision


def test_a_champion_moved_behind_the_lock_is_decided_again(tracking_uri, tiny_model):
    for f1 in (0.4, 0.9, 0.5):
        register(tiny_model, f1)
    client = MlflowClient()
    client.set_registered_model_alias(NAME, "champion", "1")
    with registry.promotion_lock(NAME) as lock:
        decision = registry.decide(NAME, "3")  # 0.5 beats 0.4
        client.set_registered_model_alias(NAME, "champion", "2")  # moved without the lock
        with pytest.raises(registry.ChampionMoved):
            registry.promote(decision, lock=lock)
    assert champion() == "2"
    # decide_and_promote decides again: 0.5 does not beat 0.9, @champion stays on version 2.
    result, decision = promote("3")
    assert result.exit_code == 0, result.output
    assert not decision["promote"] and decision["champion"] == "2" and champion() == "2"


def test_a_clock_ahead_of_the_server_does_not_shorten_the_lock(
    tracking_uri, tiny_model, monkeypatch
):
    """A live holder's lock, seen by a process whose clock runs an hour ahead of the server's
    creation timestamps: it is not taken as stale (the wait is measured on the waiter's own
    clock)."""
    register(tiny_model, 0.80)
    MlflowClient().create_registered_model(NAME + registry.LOCK_SUFFIX, tags={"owner": "live"})
    real_time = time.time
    monkeypatch.setattr(registry.time, "time", lambda: real_time() + 3600)
    with pytest.raises(ValueError, match="holds the lock"):
        with registry.promotion_lock(NAME, wait_s=1.0, stale_s=60):
            pass
    assert MlflowClient().get_registered_model(NAME + registry.LOCK_SUFFIX).tags == {
        "owner": "live"
    }


def test_a_resumed_registration_sets_challenger_or_says_who_has_it(tracking_uri, tiny_model):
    """Issue 23, item 7: a run killed between registering and setting @challenger, resumed."""
    register(tiny_model, 0.8)
    killed = register(tiny_model, 0.7, alias=False)  # version 2, @challenger still on 1
    assert registry.aliased(NAME, "challenger") == "1"
    again = registry.register_run_model(killed.run_id, killed.source, NAME)
    assert again.version == killed.version and registry.aliased(NAME, "challenger") == "2"
    # A newer version took the alias meanwhile: the resumed run leaves it there.
    late = register(tiny_model, 0.6, alias=False)  # version 3, killed too
    register(tiny_model, 0.5)  # version 4
    registry.register_run_model(late.run_id, late.source, NAME)
    assert registry.aliased(NAME, "challenger") == "4"
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == 4


def test_nan_min_delta_is_refused(tracking_uri, tiny_model):
    register(tiny_model, 0.80)
    result, _ = promote("--min-delta", "nan")
    assert result.exit_code == 1 and "min_delta must be a number >= 0, got nan" in result.output


def test_a_nan_metric_never_wins(tracking_uri, tiny_model):
    """A version whose promotion metric or a recall is NaN is never promoted, not even as the
    first version or with --force; a NaN comparison used to let it through."""
    register(tiny_model, float("nan"))
    result, decision = promote()
    assert (
        result.exit_code == 0
        and not decision["promote"]
        and "never becomes champion" in (decision["reason"])
    )
    assert "champion" not in MlflowClient().get_registered_model(NAME).aliases
    register(tiny_model, 0.5)
    result, decision = promote()
    assert decision["promote"] and champion() == "2"
    register(tiny_model, float("nan"))
    for extra in ((), ("--force",)):
        result, decision = promote(*extra)
        assert not decision["promote"] and champion() == "2", extra
    register(tiny_model, 0.9, recalls=(0.9, float("nan"), 0.9, 0.9))
    result, decision = promote()
    assert not decision["promote"] and "early_pre_b" in decision["reason"] and champion() == "2"
