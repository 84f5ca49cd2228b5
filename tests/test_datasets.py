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
