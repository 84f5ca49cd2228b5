"""Training and evaluation loops on a tiny timm model and synthetic images."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from leukemia import engine
from leukemia import model as m
from leukemia.datasets import ManifestDataset, build_transform, class_weights


def run_epochs(processed, epochs: int, phase: str, seed: int = 0):
    torch.manual_seed(seed)
    train = ManifestDataset(processed, "train", build_transform(train=True))
    val = ManifestDataset(processed, "val", build_transform(train=False))
    classifier = m.create_classifier("test_efficientnet", pretrained="none")
    if phase == "head":
        m.freeze_backbone(classifier)
    else:
        m.unfreeze_last(classifier, 10)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights(train.labels))
    optimizer = torch.optim.AdamW(m.trainable_parameters(classifier), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=8, shuffle=True, generator=generator)
    history = [
        engine.train_one_epoch(classifier, loader, loss_fn, optimizer) for _ in range(epochs)
    ]
    result = engine.evaluate(classifier, DataLoader(val, batch_size=8), loss_fn)
    return classifier, history, result


def test_phase1_leaves_the_backbone_untouched(small_processed):
    classifier, history, result = run_epochs(small_processed, 2, "head")
    reference = dict(classifier.backbone.state_dict())  # weights and BatchNorm statistics
    torch.manual_seed(0)  # the seed run_epochs built its model with
    fresh = m.create_classifier("test_efficientnet", pretrained="none").backbone.state_dict()
    for name, tensor in reference.items():
        assert torch.equal(tensor, fresh[name]), f"{name} changed in phase 1"
    assert all(p.grad is None for p in classifier.backbone.parameters())
    assert len(history) == 2 and history[0]["images_per_second"] > 0
    assert result["probabilities"].shape == (4, 4)
    assert torch.allclose(result["probabilities"].sum(1), torch.ones(4))


def test_same_seed_same_metrics_on_cpu(small_processed):
    _, first, a = run_epochs(small_processed, 2, "fine-tune", seed=3)
    _, again, b = run_epochs(small_processed, 2, "fine-tune", seed=3)
    assert [h["loss"] for h in first] == [h["loss"] for h in again]
    assert a["loss"] == b["loss"] and torch.equal(a["probabilities"], b["probabilities"])


def test_frozen_batchnorm_keeps_running_statistics(small_processed):
    classifier = m.create_classifier("test_efficientnet", pretrained="none")
    m.unfreeze_last(classifier, 10)
    m.set_train_mode(classifier, freeze_bn_stats=True)
    norms = [x for x in classifier.backbone.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert norms and not any(x.training for x in norms)
    m.set_train_mode(classifier, freeze_bn_stats=False)
    trainable = [x for x in norms if any(p.requires_grad for p in x.parameters())]
    assert trainable and all(x.training for x in trainable)
    assert not any(x.training for x in norms if x not in trainable)
