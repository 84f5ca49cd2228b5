"""The classifier, Keras' layer count for phase 2, local and unreachable ImageNet weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from leukemia import model as m

from .conftest import REPO

WEIGHTS = REPO.parent / "shared" / "weights" / "efficientnet_lite0.imagenet.safetensors"


def test_b4_last_60_keras_layers_match_keras_parameter_count():
    classifier = m.create_classifier("efficientnet_b4", pretrained="none")
    assert len(m.keras_layers(classifier.backbone)) == 471  # Keras' 474 less input/rescaling
    names = m.unfreeze_last(classifier, 60)
    assert len(names) == 60 and names[0] == "block6g_expand_bn" and names[-1] == "top_activation"
    assert m.count_trainable(classifier.backbone) == 7_151_164
    trainable = {n for n, p in classifier.backbone.named_parameters() if p.requires_grad}
    assert "blocks.5.6.conv_pw.weight" not in trainable
    assert {
        "blocks.5.6.bn1.weight",
        "blocks.5.7.conv_pw.weight",
        "conv_head.weight",
        "bn2.weight",
        "blocks.6.0.conv_pw.weight",
    } <= trainable
    assert m.count_trainable(classifier) == 7_151_164 + 1792 * 4 + 4


def test_phase1_trains_only_the_head_and_shapes():
    classifier = m.create_classifier("test_efficientnet", pretrained="none", dropout=0.4)
    m.freeze_backbone(classifier)
    assert m.trainable_parameters(classifier) == list(classifier.head.parameters())
    classifier.eval()
    logits = classifier(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 4)
    assert m.unfreeze_last(classifier, 0) == []
    with pytest.raises(ValueError, match="unfreeze_last must be >= 0"):
        m.unfreeze_last(classifier, -1)


def test_bad_model_dropout_and_weights_path(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model 'efficientnet_b99'"):
        m.create_classifier("efficientnet_b99", pretrained="none")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        m.create_classifier("test_efficientnet", pretrained="none", dropout=1.5)
    with pytest.raises(ValueError, match="'imagenet', 'none' or a weights file"):
        m.create_classifier("test_efficientnet", pretrained=str(tmp_path / "nope.pth"))


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="shared ImageNet weights absent")
def test_local_imagenet_weights_load_into_the_backbone():
    from safetensors.torch import load_file

    classifier = m.create_classifier("efficientnet_lite0", pretrained=str(WEIGHTS))
    state = load_file(str(WEIGHTS))
    assert torch.equal(classifier.backbone.conv_stem.weight, state["conv_stem.weight"])
    assert classifier.head.out_features == 4
    with pytest.raises(ValueError, match="does not fit the backbone"):
        m.create_classifier("test_efficientnet", pretrained=str(WEIGHTS))


def test_unreachable_hub_names_both_ways_out():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = "from leukemia.model import create_classifier; create_classifier('test_efficientnet')"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "PretrainedWeightsError" in done.stderr
    assert "pretrained=none" in done.stderr and "pretrained=/path/to/" in done.stderr
