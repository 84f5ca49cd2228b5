"""The two-phase loop: phases, early stopping, and resuming to identical numbers on CPU."""

from __future__ import annotations

import pytest
import torch

from leukemia.config import load_config
from leukemia.train import STATE_FILE, Diverged, phases, train

from .conftest import REPO


def demo(**overrides):
    return load_config(
        REPO / "experiments" / "demo.yaml",
        {"phase1_epochs": 2, "phase2_epochs": 2, "patience": 0, **overrides},
    )


def test_phases_follow_the_config():
    plan = phases(load_config())
    assert [(p.name, p.epochs, p.unfreeze_last) for p in plan] == [
        ("phase1", 50, None),
        ("phase2", 30, 60),
    ]
    assert len(phases(load_config(None, {"phase2_epochs": 0}))) == 1


def test_global_epochs_and_phase_summary(small_processed, tmp_path):
    records = []
    result = train(demo(), small_processed, tmp_path / "work", on_epoch=records.append)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["phase"] for r in records] == ["phase1", "phase1", "phase2", "phase2"]
    summary = result["summary"]
    assert summary["phase2_start_epoch"] == 3
    assert summary["phase1_trainable_params"] < summary["phase2_trainable_params"]
    assert 1 <= summary["phase1_best_epoch"] <= 2 and 3 <= summary["phase2_best_epoch"] <= 4


def test_early_stopping_stops_a_phase(small_processed, tmp_path):
    config = demo(phase1_epochs=6, phase2_epochs=0, patience=1, phase1_lr=1e-12)
    records = []
    train(config, small_processed, tmp_path / "work", on_epoch=records.append)
    assert 2 <= len(records) < 6  # a rate of 1e-12 cannot keep improving the loss


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_a_diverged_loss_stops_training_naming_the_rate(small_processed, tmp_path, phase):
    """Issue 23, item 11: a learning rate of 1e30 used to end in a TypeError (no best weights to
    restore); now the epoch whose loss is not finite stops training in one line."""
    config = demo(phase1_epochs=1, phase2_epochs=1, **{f"{phase}_lr": 1e30})
    records = []
    with pytest.raises(Diverged, match=rf"\({phase}\) is nan; .* lower {phase}_lr \(1e\+30\)$"):
        train(config, small_processed, tmp_path / "work", on_epoch=records.append)
    assert [r["phase"] for r in records] == (["phase1"] if phase == "phase2" else [])


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", [2, 3, 4])  # mid phase 1, first and last of phase 2
def test_interrupted_run_resumes_to_identical_numbers(small_processed, tmp_path, kill_at):
    full = train(demo(), small_processed, tmp_path / "full")

    def die(record):
        if record["epoch"] == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train(demo(), small_processed, tmp_path / "resumed", on_epoch=die)
    saved = torch.load(tmp_path / "resumed" / STATE_FILE, weights_only=True)
    assert saved["global_epoch"] == kill_at - 1
    resumed = train(demo(), small_processed, tmp_path / "resumed", resume=True)
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in full["history"]]
    assert [r["train_loss"] for r in resumed["history"]] == [
        r["train_loss"] for r in full["history"]
    ]
    for name, tensor in full["model"].state_dict().items():
        assert torch.equal(tensor, resumed["model"].state_dict()[name]), name


def test_phase1_fast_path_trains_as_the_batch_loop(small_processed, tmp_path):
    """Phase 1 with the backbone run on chunks of 4 batches (and evaluation in large batches)
    is the same training as the plain batch-by-batch loop: same losses per epoch, same head."""
    config = demo(phase1_epochs=3, phase2_epochs=0, batch_size=4, dropout=0.4)
    plain = train(config, small_processed, tmp_path / "plain", chunk=0)
    fast = train(config, small_processed, tmp_path / "fast", chunk=16)
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        expected = [r[key] for r in plain["history"]]
        assert [r[key] for r in fast["history"]] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # Several distinct losses: the head really trained, so equal numbers mean equal training.
    assert len({round(r["train_loss"], 6) for r in plain["history"]}) == 3
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(
            fast["model"].state_dict()[name],
            plain["model"].state_dict()[name],
            rtol=1e-4,
            atol=1e-6,
        )
