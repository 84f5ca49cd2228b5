"""The classifier: a timm backbone + global average pooling + dropout + a linear layer.

Phase 2 of the paper unfreezes "the last N layers" of Keras' EfficientNet. ``keras_layers``
lists a timm EfficientNet as Keras counts it, so that ``unfreeze_last(model, 60)`` trains the
same weights Keras would: for efficientnet_b4 that is ``conv_head``, ``bn2``, ``blocks[6]``,
``blocks[5][7]`` and ``blocks[5][6]`` except its ``conv_pw`` (7,151,164 backbone parameters).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import timm
import torch
from torch import nn


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights could not be had; the message names the ways out."""


EXPOSURE_LEVEL = 0.5  # exposure_norm: every image's mean intensity (0..1) is scaled to this


class Classifier(nn.Module):
    """backbone (features, pooled) -> Dropout(p) -> Linear(num_classes); logits out.

    With ``exposure_norm`` (not the paper's), each image's exposure is undone before the
    backbone: back from the backbone's normalisation to intensities, scaled so the image's mean
    intensity is ``EXPOSURE_LEVEL``, normalised again. Under- or over-exposure by a factor (up
    to where bright pixels saturate) then reaches the backbone as the same image. It is part of
    the network, so training, evaluation and the served model all apply it; it has no weights.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, dropout: float, exposure_norm: bool = False
    ):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.exposure_norm = bool(exposure_norm)
        if self.exposure_norm:
            cfg = backbone.pretrained_cfg  # what the input was normalised with
            for name in ("mean", "std"):
                value = torch.tensor(cfg[name], dtype=torch.float32).view(1, 3, 1, 1)
                self.register_buffer(f"input_{name}", value, persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (N x 3 x S x S) -> pooled backbone features (N x F)."""
        if self.exposure_norm:
            intensity = images * self.input_std + self.input_mean
            level = intensity.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
            images = (intensity * (EXPOSURE_LEVEL / level) - self.input_mean) / self.input_std
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.backbone.parameters()):
            # Phase 1: a frozen backbone builds no autograd graph, so an epoch costs about
            # what inference costs.
            with torch.no_grad():
                features = self.features(images)
        else:
            features = self.features(images)
        return self.classify(features)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The head alone: pooled backbone features (N x F) -> logits (N x C)."""
        return self.head(self.dropout(features))


def set_train_mode(model: Classifier, freeze_bn_stats: bool = True) -> None:
    """``model.train()``, except BatchNorm layers keep their running statistics: all of them
    when ``freeze_bn_stats`` (Keras calling the base model in inference mode), else those
    whose parameters are frozen."""
    model.train()
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
            if freeze_bn_stats or frozen:
                module.eval()


def deterministic(backbone: nn.Module) -> bool:
    """Whether the backbone draws no random numbers in training mode (no active dropout or
    stochastic depth), so that phase 1 may run it on chunks of batches
    (``engine.train_head_epoch``) without changing the dropout draws of the head."""
    if getattr(backbone, "drop_rate", 0) > 0:  # timm's dropout before the (removed) classifier
        return False
    for module in backbone.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return False
        if getattr(module, "drop_prob", 0) > 0:  # timm's DropPath
            return False
    return True


def create_classifier(
    model_name: str = "efficientnet_b4",
    *,
    num_classes: int = 4,
    dropout: float = 0.4,
    pretrained: str = "imagenet",
    exposure_norm: bool = False,
) -> Classifier:
    """Build the classifier. ``pretrained``: ``imagenet`` (timm downloads from the Hugging Face
    hub), ``none``, or a path to a local ``.safetensors``/``.pth`` state dict of the backbone;
    ``exposure_norm``: see ``Classifier``."""
    check_model_name(model_name)
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if pretrained == "imagenet":
        try:
            backbone = timm.create_model(
                model_name, pretrained=True, num_classes=0, global_pool="avg"
            )
        except (OSError, RuntimeError, ValueError) as error:
            raise PretrainedWeightsError(
                f"could not download ImageNet weights for {model_name!r} ({type(error).__name__}:"
                f" {str(error).splitlines()[0] if str(error) else 'no details'}); use "
                "pretrained=none to train from scratch, or pretrained=/path/to/weights.safetensors"
                " for a local state dict"
            ) from None
    else:
        backbone = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="avg")
        if pretrained != "none":
            load_backbone_weights(backbone, pretrained)
    return Classifier(backbone, num_classes, dropout, exposure_norm)


def check_model_name(model_name: str) -> None:
    """Raise for a name timm does not know, suggesting the closest ones it does."""
    known = timm.list_models()
    if model_name in known:
        return
    close = difflib.get_close_matches(model_name, known, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ValueError(f"unknown timm model {model_name!r}{hint}")


def check_image_size(backbone: nn.Module, image_size: int) -> None:
    """Raise when ``image_size`` is smaller than the backbone's total stride (the last feature
    map would be under one pixel, and the pooled features meaningless)."""
    info = getattr(backbone, "feature_info", None)
    reduction = info[-1]["reduction"] if info else 1
    if image_size < reduction:
        raise ValueError(
            f"image_size {image_size} is too small for {type(backbone).__name__}, which "
            f"downsamples by {reduction}; use image_size >= {reduction}"
        )


def error_summary(error: BaseException, first_sentence: bool = False) -> str:
    """An exception's message on one line without its final full stop, to go inside a
    sentence; ``first_sentence``: only its first sentence, at most 200 characters (torch and
    safetensors explain at length)."""
    text = " ".join(str(error).split())
    if first_sentence:
        text = text.split(". ")[0][:200]
    return text.rstrip(".") or type(error).__name__


def read_state_dict(path: str | os.PathLike, what: str) -> dict:
    """A state dict from a ``.safetensors`` file, else a ``torch.save`` file read with
    ``weights_only`` (tensors and plain containers: no code). ValueError names the file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt files fail in many ways; all are refused
        raise ValueError(
            f"{what} {str(path)!r} is not a readable state dict "
            f"({error_summary(error, first_sentence=True)}); expected a "
            ".safetensors or torch.save file of tensors"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{what} {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state dict into ``backbone``; classifier weights in it are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"pretrained must be 'imagenet', 'none' or a weights file; {str(path)!r} is none"
        )
    state = read_state_dict(path, "pretrained weights")
    state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
    head_names = {
        f"{getattr(backbone, 'default_cfg', {}).get('classifier', 'classifier')}.{s}"
        for s in ("weight", "bias")
    }
    state = {k: v for k, v in state.items() if k not in head_names}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of the wrong shape
        detail = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ValueError(f"{str(path)!r} does not fit the backbone: {detail}") from None
    if missing or unexpected:
        raise ValueError(
            f"{str(path)!r} does not fit the backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


# ---------------------------------------------------------------------------------------------
# Keras' layer count


def _block_layers(block: nn.Module) -> list[tuple[str, nn.Module | None]]:
    """One timm MBConv block as Keras lists its layers (None: a layer without weights)."""
    kind = type(block).__name__
    se = getattr(block, "se", None)
    has_se = se is not None and hasattr(se, "conv_reduce")
    stride = getattr(getattr(block, "conv_dw", None), "stride", (1, 1))
    if kind == "InvertedResidual":
        layers = [
            ("expand_conv", block.conv_pw),
            ("expand_bn", block.bn1),
            ("expand_activation", None),
        ]
        depthwise, project = (
            [("dwconv", block.conv_dw), ("bn", block.bn2)],
            [("project_conv", block.conv_pwl), ("project_bn", block.bn3)],
        )
    elif kind == "DepthwiseSeparableConv":
        layers = []
        depthwise, project = (
            [("dwconv", block.conv_dw), ("bn", block.bn1)],
            [("project_conv", block.conv_pw), ("project_bn", block.bn2)],
        )
    else:  # other block types: one layer per child module, in order
        return [(name, module) for name, module in block.named_children()]
    if tuple(stride) == (2, 2):
        layers.append(("dwconv_pad", None))
    layers += [*depthwise, ("activation", None)]
    if has_se:
        layers += [
            ("se_squeeze", None),
            ("se_reshape", None),
            ("se_reduce", se.conv_reduce),
            ("se_expand", se.conv_expand),
            ("se_excite", None),
        ]
    layers += project
    if getattr(block, "has_skip", False):
        layers += [("drop", None), ("add", None)]
    return layers


def keras_layers(backbone: nn.Module) -> list[tuple[str, nn.Module | None]]:
    """A timm EfficientNet's layers in Keras' order: stem, every block, top."""
    layers = [
        ("stem_conv_pad", None),
        ("stem_conv", backbone.conv_stem),
        ("stem_bn", backbone.bn1),
        ("stem_activation", None),
    ]
    for s, stage in enumerate(backbone.blocks):
        for b, block in enumerate(stage):
            layers += [(f"block{s + 1}{chr(97 + b)}_{n}", m) for n, m in _block_layers(block)]
    if hasattr(backbone, "conv_head"):
        layers += [
            ("top_conv", backbone.conv_head),
            ("top_bn", backbone.bn2),
            ("top_activation", None),
        ]
    return layers


def freeze_backbone(model: Classifier) -> None:
    """Phase 1: no gradients anywhere in the backbone; only the head trains."""
    model.backbone.requires_grad_(False)
    model.head.requires_grad_(True)


def unfreeze_last(model: Classifier, n: int) -> list[str]:
    """Phase 2: the backbone frozen except its last ``n`` Keras layers. Returns their names."""
    if n < 0:
        raise ValueError(f"unfreeze_last must be >= 0, got {n}")
    freeze_backbone(model)
    chosen = keras_layers(model.backbone)[-n:] if n else []
    for _, module in chosen:
        if module is not None:
            module.requires_grad_(True)
    return [name for name, _ in chosen]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(module))
