"""Dataset over a preprocess output, the paper's augmentation, class weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from leukemia import images
from leukemia.data import DatasetError
from leukemia.datasets import ManifestDataset, build_transform, class_weights
from leukemia.preprocess import preprocess


@pytest.fixture(scope="module")
def processed(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("processed") / "segmented"
    return preprocess(synthetic_dir, out, progress=False, workers=1).out_dir


def test_class_weights_are_sklearns_balanced_weights():
    labels = [0] * 10 + [1] * 30 + [2] * 40 + [3] * 20
    expected = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    np.testing.assert_allclose(class_weights(labels).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(class_weights([0, 1, 1, 1], 2).numpy(), [2.0, 2 / 3], rtol=1e-6)
    with pytest.raises(DatasetError, match=r"\['Pro-B'\] have no training images"):
        class_weights([0, 1, 2])


def test_dataset_reads_the_split_as_the_model_sees_it(processed):
    train = ManifestDataset(processed, "train")
    test = ManifestDataset(processed, "test", transform=build_transform(train=False))
    assert len(train) == 24 and len(test) == 4
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 224, 224)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    expected = images.read_png(processed / train.rows[0]["processed"])
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(expected))
    assert label == int(train.rows[0]["label"])
    normalised, _ = test[0]
    assert normalised.dtype == torch.float32
    assert torch.equal(normalised, test[0][0]), "evaluation transform is deterministic"
    with pytest.raises(ValueError, match="unsupported split"):
        ManifestDataset(processed, "holdout")
    with pytest.raises(DatasetError, match="run leukemia preprocess first"):
        ManifestDataset(processed / "nowhere", "train")


def test_augmentation_is_seeded_and_shape_preserving(processed):
    image, _ = ManifestDataset(processed, "train")[0]
    augment = build_transform(train=True)
    torch.manual_seed(0)
    first = augment(image)
    torch.manual_seed(0)
    again = augment(image)
    torch.manual_seed(1)
    other = augment(image)
    assert first.shape == image.shape and torch.equal(first, again)
    assert not torch.equal(first, other)


def test_batch_transform_normalises_like_the_per_image_transform(processed):
    from leukemia.datasets import BatchTransform

    images = torch.stack([ManifestDataset(processed, "val")[i][0] for i in range(3)])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = torch.stack([build_transform(False, mean, std)(image) for image in images])
    assert torch.allclose(BatchTransform(mean, std)(images), expected, atol=1e-6)


def test_batch_augmentation_is_drawn_from_its_generator(processed):
    from leukemia.datasets import BatchTransform

    images = torch.stack([ManifestDataset(processed, "train")[i][0] for i in range(4)])

    def augmented(seed):
        generator = torch.Generator().manual_seed(seed)
        return BatchTransform((0.5,) * 3, (0.5,) * 3, augment=True, generator=generator)(images)

    first, again, other = augmented(0), augmented(0), augmented(1)
    assert first.shape == images.shape and torch.equal(first, again)
    assert not torch.equal(first, other)
    plain = BatchTransform((0.5,) * 3, (0.5,) * 3)(images)
    assert not torch.equal(first, plain)
    # Keras' nearest-edge fill: a white image stays white (zero fill would add black corners).
    white = torch.full((8, 3, 32, 32), 255, dtype=torch.uint8)
    shifted = BatchTransform((0.0,) * 3, (1.0,) * 3, augment=True)(white)
    assert torch.allclose(shifted, torch.ones_like(shifted))


def test_identity_parameters_leave_the_image_unchanged(processed):
    from leukemia.datasets import BatchTransform

    images = torch.stack([ManifestDataset(processed, "val")[i][0] for i in range(2)])
    transform = BatchTransform((0.5,) * 3, (0.5,) * 3, augment=True)
    transform.affine = lambda n: torch.eye(2, 3).expand(n, 2, 3)
    assert torch.allclose(
        transform(images), BatchTransform((0.5,) * 3, (0.5,) * 3)(images), atol=1e-4
    )


IDENTITY = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "gamma": 1.0}


def _one(name, value):
    return {k: torch.tensor([value if k == name else v]) for k, v in IDENTITY.items()}


@pytest.mark.parametrize(
    "name, value, enhance",
    [
        ("brightness", 1.3, "Brightness"),
        ("contrast", 0.6, "Contrast"),
        ("saturation", 1.5, "Color"),
    ],
)
def test_colour_jitter_matches_pil(name, value, enhance):
    # An independent reference: PIL's ImageEnhance, which torchvision's adjust_* follow.
    from PIL import Image, ImageEnhance

    from leukemia.datasets import colour_jitter

    rgb = np.random.default_rng(0).integers(30, 220, (5, 5, 3), dtype=np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).unsqueeze(0)
    got = colour_jitter(x, _one(name, value))[0].permute(1, 2, 0).numpy() * 255
    expected = np.asarray(getattr(ImageEnhance, enhance)(Image.fromarray(rgb)).enhance(value))
    assert np.abs(got - expected.astype(np.float64)).max() <= 2.0


def test_colour_jitter_hue_and_gamma_known_answers():
    import colorsys

    from leukemia.datasets import colour_jitter

    rgb = np.random.default_rng(1).uniform(0.1, 0.9, (4, 4, 3))
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().unsqueeze(0)
    gamma = colour_jitter(x, _one("gamma", 0.7))[0].permute(1, 2, 0).numpy()
    assert np.allclose(gamma, rgb**0.7, atol=1e-5)
    hue = colour_jitter(x, _one("hue", 0.1))[0].permute(1, 2, 0).numpy()
    for pixel, shifted in zip(rgb.reshape(-1, 3), hue.reshape(-1, 3)):
        h, s, v = colorsys.rgb_to_hsv(*pixel)
        assert np.allclose(shifted, colorsys.hsv_to_rgb((h + 0.1) % 1.0, s, v), atol=1e-4)


def test_colour_jitter_is_per_image_and_off_by_default(processed):
    from leukemia.datasets import BatchTransform, colour_factors

    images = torch.stack([ManifestDataset(processed, "train")[i][0] for i in range(4)])
    factors = colour_factors(1000, 0.4, torch.Generator().manual_seed(0))
    assert all(len(v) == 1000 for v in factors.values())
    assert 0.6 <= float(factors["brightness"].min()) < float(factors["brightness"].max()) <= 1.4
    assert -0.1 <= float(factors["hue"].min()) < float(factors["hue"].max()) <= 0.1

    def augmented(colour):
        generator = torch.Generator().manual_seed(0)
        transform = BatchTransform((0.5,) * 3, (0.5,) * 3, True, generator, colour=colour)
        return transform(images)

    # colour 0 draws nothing more: the paper's augmentation, number for number.
    paper = BatchTransform((0.5,) * 3, (0.5,) * 3, True, torch.Generator().manual_seed(0))
    assert torch.equal(augmented(0.0), paper(images))
    jittered = augmented(0.4)
    assert torch.equal(jittered, augmented(0.4)) and not torch.equal(jittered, augmented(0.0))
    # Two copies of one image in one batch get different colours.
    same = BatchTransform((0.5,) * 3, (0.5,) * 3, False, colour=0.4)
    same.augment = True
    same.affine = lambda n: torch.eye(2, 3).expand(n, 2, 3)
    pair = same(images[:1].expand(2, -1, -1, -1).contiguous())
    assert not torch.allclose(pair[0], pair[1])
    with pytest.raises(ValueError, match=r"colour jitter must be in \[0, 1\), got 1.5"):
        BatchTransform((0.5,) * 3, (0.5,) * 3, colour=1.5)


def test_exposure_jitter_scales_and_clips_and_is_off_by_default(processed):
    from leukemia.datasets import BatchTransform, expose, exposure_factors

    factors = exposure_factors(20000, 0.8, torch.Generator().manual_seed(0))
    assert 1 / 1.8 <= float(factors.min()) < 1 < float(factors.max()) <= 1.8
    # log-uniform: halving and doubling equally likely; about one draw in five above x1.4.
    assert abs(float(torch.log(factors).mean())) < 0.01
    assert 0.19 < float((factors > 1.4).float().mean()) < 0.24
    x = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = expose(x, torch.tensor([0.5, 1.5]))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.1, 0.25, 0.45]))
    assert torch.allclose(out[1, :, 0, 0], torch.tensor([0.3, 0.75, 1.0]))  # 1.35 clipped

    images = torch.stack([ManifestDataset(processed, "train")[i][0] for i in range(4)])

    def augmented(exposure):
        generator = torch.Generator().manual_seed(0)
        return BatchTransform((0.5,) * 3, (0.5,) * 3, True, generator, exposure=exposure)(images)

    assert torch.equal(
        augmented(0.0),
        BatchTransform((0.5,) * 3, (0.5,) * 3, True, torch.Generator().manual_seed(0))(images),
    )
    assert torch.equal(augmented(0.8), augmented(0.8))
    assert not torch.equal(augmented(0.8), augmented(0.0))
    with pytest.raises(ValueError, match=r"exposure jitter must be >= 0, got -0.5"):
        BatchTransform((0.5,) * 3, (0.5,) * 3, exposure=-0.5)


def test_in_memory_split_gives_the_same_items_as_reading_from_disk(processed, monkeypatch):
    from leukemia import datasets

    on_disk = ManifestDataset(processed, "train")
    held = ManifestDataset(processed, "train", in_memory=True)
    assert held.decoded is not None and held.decoded.dtype == torch.uint8
    assert held.decoded.shape == (len(on_disk), *on_disk[0][0].shape)
    for index in range(len(on_disk)):
        image, label = held[index]
        assert torch.equal(image, on_disk[index][0]) and label == on_disk[index][1]
    monkeypatch.setattr(datasets, "IN_MEMORY_LIMIT_BYTES", 10)
    too_large = ManifestDataset(processed, "train", in_memory=True)
    assert too_large.decoded is None and torch.equal(too_large[3][0], on_disk[3][0])
