"""Training on CUDA: mixed precision, channels-last, and resume. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from leukemia.config import load_config
from leukemia.engine import resolve_precision
from leukemia.train import train

from .conftest import REPO

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def tiny(**overrides):
    return load_config(
        REPO / "experiments" / "demo.yaml",
        {"phase1_epochs": 1, "phase2_epochs": 2, "patience": 0, "device": "cuda", **overrides},
    )


@requires_cuda
def test_auto_precision_on_cuda_is_mixed():
    precision = resolve_precision("auto", torch.device("cuda"))
    assert precision.name in ("bf16", "fp16") and precision.channels_last


@requires_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_trains_on_cuda(small_processed, tmp_path, precision):
    result = train(tiny(precision=precision), small_processed, tmp_path)
    assert result["device"].startswith("cuda") and result["precision"] == precision
    losses = [r["train_loss"] for r in result["history"]]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # no NaN
    parameter = next(result["model"].parameters())
    assert parameter.is_cuda


@requires_cuda
def test_resume_on_cuda_continues_from_the_saved_epoch(small_processed, tmp_path):
    class Killed(Exception):
        pass

    def die(record):
        if record["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(tiny(), small_processed, tmp_path, on_epoch=die)
    resumed = train(tiny(), small_processed, tmp_path, resume=True)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
