"""Evaluation: a logged model loaded from every kind of source and scored exactly as the served
model scores, perturbations with known effects, Grad-CAM against the class activation map, and
one tracked evaluate run."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from safetensors.torch import save_file

from leukemia import evaluation, gradcam, images, serving, synthetic, tracking
from leukemia.data import CLASSES, prob_column, read_manifest
from leukemia.datasets import build_transform
from leukemia.evaluation import PERTURBATIONS
from leukemia.model import create_classifier
from leukemia.model_files import ModelSpec
from leukemia.segmentation import SegmentationParams, preprocess_image
from leukemia.steps import evaluate as evaluate_step

SEG = SegmentationParams(image_size=64)
PROB_COLUMNS = [prob_column(name) for name in CLASSES]
REGISTERED = "leukemia-classifier"
# The model runs on CUDA when there is one; TF32 convolutions there differ from the CPU
# reference (and between batch compositions) in the fourth decimal, on the CPU in the ninth.
ATOL = 1e-4 if torch.cuda.is_available() else 1e-6


def _classifier():
    torch.manual_seed(0)
    model = create_classifier("test_efficientnet", num_classes=4, dropout=0.2, pretrained="none")
    return model.eval()


def _mean_std(classifier):
    cfg = classifier.backbone.pretrained_cfg
    return cfg["mean"], cfg["std"]


def _spec(classifier) -> ModelSpec:
    """What training records for ``_classifier()``: the served model's ``model.json``."""
    mean, std = _mean_std(classifier)
    return ModelSpec.for_classifier(
        classifier,
        model_name="test_efficientnet",
        dropout=0.2,
        mean=mean,
        std=std,
        segmentation=SEG,
    )


def _write_model_folder(folder: Path, classifier) -> Path:
    """The two files by hand, as a downloaded ``checkpoint/`` folder holds them."""
    mean, std = _mean_std(classifier)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in classifier.state_dict().items()},
        folder / "weights.safetensors",
    )
    config = {
        "model": "test_efficientnet",
        "dropout": 0.2,
        "num_classes": 4,
        "classes": list(CLASSES),
        "mean": list(mean),
        "std": list(std),
        "segmentation": SEG.to_dict(),
        "max_pixels": images.DEFAULT_MAX_PIXELS,
    }
    (folder / "model.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def classifier():
    return _classifier()


@pytest.fixture(scope="module")
def model(classifier, tmp_path_factory):
    folder = _write_model_folder(tmp_path_factory.mktemp("model") / "checkpoint", classifier)
    return evaluate_step.load_model(str(folder))


def _smears(sizes=(64, 80, 48, 96)) -> list[np.ndarray]:
    return [synthetic.make_image(3, CLASSES[i % 4], i, size)[0] for i, size in enumerate(sizes)]


def _reference_probabilities(classifier, rgbs) -> np.ndarray:
    """The bare classifier on images preprocessed by hand, as the training Dataset does."""
    transform = build_transform(False, *_mean_std(classifier))
    batch = torch.stack(
        [transform(torch.from_numpy(preprocess_image(rgb, SEG)).permute(2, 0, 1)) for rgb in rgbs]
    )
    with torch.inference_mode():
        return torch.softmax(classifier(batch), dim=1).double().numpy()


def _same_weights(model, classifier) -> bool:
    loaded = model.classifier.state_dict()
    return all(torch.equal(loaded[k].cpu(), v) for k, v in classifier.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_model_from_run_and_registry_uris_predicts_as_the_served_model(
    tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    classifier = _classifier()
    with mlflow.start_run() as run:
        spec = _spec(classifier)
        info = serving.log_served_model(classifier, spec, registered_model_name=REGISTERED)
    run_id = run.info.run_id
    MlflowClient().set_registered_model_alias(REGISTERED, "champion", info.registered_model_version)

    rgbs = _smears()
    request = pd.DataFrame(
        {"image": [base64.b64encode(images.encode_png(rgb)).decode("ascii") for rgb in rgbs]}
    )
    served = mlflow.pyfunc.load_model(info.model_uri).predict(request)[PROB_COLUMNS].to_numpy()
    local_pyfunc = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "d"))
    sources = {
        f"runs:/{run_id}": f"runs:/{run_id}/classifier",
        f"runs:/{run_id}/classifier": f"runs:/{run_id}/classifier",
        f"models:/{REGISTERED}@champion": f"models:/{REGISTERED}@champion",
        f"models:/{REGISTERED}/1": f"models:/{REGISTERED}/1",
        local_pyfunc: str(Path(local_pyfunc).resolve()),  # weights in its artifacts/
    }
    for source, normalised in sources.items():
        model = evaluate_step.load_model(source)
        assert model.source == normalised
        assert not model.classifier.training and _same_weights(model, classifier)
        assert model.spec.to_json()["segmentation"]["image_size"] == 64 and model.image_size == 64
        # Several chunks and images of several sizes, against the pyfunc's own answer.
        probabilities = evaluation.predict_rgb(model, rgbs, batch_size=3)
        np.testing.assert_allclose(probabilities, served, atol=ATOL, rtol=0)

    failures = {
        f"models:/{REGISTERED}@nope": "alias nope not found",
        f"models:/{REGISTERED}/7": "version",
        "models:/no-such-model/1": "no-such-model",
        f"runs:/{'0' * 32}": "not found",
        "runs:/not-a-run/classifier": "not-a-run not found",
        f"runs:/{run_id}/no-such-model": "no-such-model",
        "s3x://bucket/model": "unsupported model URI",
    }
    for source, reason in failures.items():
        with pytest.raises(ValueError) as caught:
            evaluate_step.load_model(source)
        message = str(caught.value)
        assert "\n" not in message and source in message and "expected runs:/" in message
        assert reason in message


def test_load_model_from_local_files_and_what_it_refuses(classifier, tmp_path):
    folder = _write_model_folder(tmp_path / "checkpoint", classifier)
    for source in (folder, folder / "weights.safetensors"):  # a folder or one of its files
        model = evaluate_step.load_model(str(source))
        assert model.source == str(source.resolve()) and _same_weights(model, classifier)
        assert model.classes == list(CLASSES)
        rgbs = _smears((72, 64))
        np.testing.assert_allclose(
            evaluation.predict_rgb(model, rgbs),
            _reference_probabilities(classifier, rgbs),
            atol=ATOL,
        )

    with pytest.raises(ValueError, match="neither a model URI nor an existing path"):
        evaluate_step.load_model(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no weights.safetensors"):
        evaluate_step.load_model(str(tmp_path / "empty"))
    config = json.loads((folder / "model.json").read_text())
    del config["mean"]
    (folder / "model.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks the keys \['mean'\]"):
        evaluate_step.load_model(str(folder))
    other = create_classifier("test_efficientnet", num_classes=3, dropout=0.2, pretrained="none")
    folder = _write_model_folder(tmp_path / "mismatch", other)  # model.json says 4 classes
    with pytest.raises(ValueError, match="does not fit a test_efficientnet with 4 classes"):
        evaluate_step.load_model(str(folder))


def test_predict_rgb_rejects_what_is_not_an_rgb_image(model):
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), "image.png"):
        with pytest.raises(ValueError, match="image 1: expected a uint8 RGB array"):
            evaluation.predict_rgb(model, [np.zeros((8, 8, 3), np.uint8), bad])
    assert evaluation.predict_rgb(model, []).shape == (0, 4)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        evaluation.predict_rgb(model, [np.zeros((8, 8, 3), np.uint8)], batch_size=0)


# ---------------------------------------------------------------------------------------------
# Perturbations


def test_perturbations_have_their_known_effects():
    expected = ["clean", "darken", "brighten", "noise", "blur", "jpeg30", "stain"]
    assert list(PERTURBATIONS) == expected
    rng = np.random.default_rng(0)
    # 5 x 5 hand-made image: values 0, 5, ..., 370 clipped to 255
    rgb = np.minimum(np.arange(75).reshape(5, 5, 3) * 5, 255).astype(np.uint8)
    assert np.array_equal(PERTURBATIONS["clean"](rgb, rng), rgb)
    darkened = PERTURBATIONS["darken"](rgb, rng)
    assert darkened[0, 0, 1] == 3 and darkened[0, 0, 2] == 6  # round(0.6 * 5), round(0.6 * 10)
    np.testing.assert_array_equal(darkened, np.rint(rgb * 0.6).astype(np.uint8))
    smear = _smears((96,))[0]
    ratio = PERTURBATIONS["darken"](smear, rng).mean() / smear.mean()
    assert ratio == pytest.approx(0.6, abs=0.005)
    brightened = PERTURBATIONS["brighten"](rgb, rng)
    assert brightened[0, 0, 1] == 7 and brightened[4, 4, 2] == 255  # round(1.4 * 5), clipped

    grey = np.full((200, 200, 3), 128, np.uint8)
    noisy = PERTURBATIONS["noise"](grey, np.random.default_rng(1))
    assert noisy.dtype == np.uint8 and noisy.std() == pytest.approx(10, rel=0.03)
    assert noisy.mean() == pytest.approx(128, abs=0.2)
    again = PERTURBATIONS["noise"](grey, np.random.default_rng(1))
    assert np.array_equal(noisy, again)  # the generator decides the noise

    assert np.array_equal(PERTURBATIONS["blur"](grey, rng), grey)  # flat stays flat
    impulse = np.zeros((9, 9, 3), np.uint8)
    impulse[4, 4] = 255
    blurred = PERTURBATIONS["blur"](impulse, rng).astype(np.float64)
    kernel = cv2.getGaussianKernel(5, 1.5)
    # OpenCV blurs uint8 in fixed point: within one grey level of the exact Gaussian.
    np.testing.assert_allclose(blurred[2:7, 2:7, 0], 255 * kernel @ kernel.T, atol=1)

    compressed = PERTURBATIONS["jpeg30"](smear, rng)
    assert compressed.shape == smear.shape and compressed.dtype == np.uint8
    difference = np.abs(compressed.astype(int) - smear)
    assert difference.max() > 0 and difference.mean() < 8

    # Stain: hue + 10 degrees, saturation x 1.25, value kept; checked with colorsys.
    import colorsys

    pixels = np.array([[[200, 100, 150], [90, 60, 180], [128, 128, 128]]], np.uint8)
    shifted = PERTURBATIONS["stain"](pixels, rng)
    for before, after in zip(pixels.reshape(-1, 3) / 255, shifted.reshape(-1, 3) / 255):
        h, s, v = colorsys.rgb_to_hsv(*before)
        expected = colorsys.hsv_to_rgb((h + 10 / 360) % 1, min(1.0, s * 1.25), v)
        np.testing.assert_allclose(after, expected, atol=3 / 255)


# ---------------------------------------------------------------------------------------------
# A manifest's raw images


def test_evaluate_manifest_scores_raw_test_images_under_each_perturbation(model, small_processed):
    manifest = small_processed / "manifest.csv"
    root = Path(json.loads((small_processed / "params.json").read_text())["dataset_root"])
    rows = [r for r in read_manifest(manifest) if r["split"] == "test"]
    results = evaluation.evaluate_manifest(
        model, manifest, perturbations=("clean", "darken", "noise"), batch_size=2
    )
    assert list(results) == ["clean", "darken", "noise"]
    raws = [images.read_image(root / r["path"]) for r in rows]
    for result in results.values():
        assert result["paths"] == [r["path"] for r in rows]
        assert result["labels"].tolist() == [CLASSES.index(r["class"]) for r in rows]
        assert result["probabilities"].shape == (len(rows), 4)
    np.testing.assert_allclose(
        results["clean"]["probabilities"], evaluation.predict_rgb(model, raws), atol=ATOL
    )
    darkened = [PERTURBATIONS["darken"](raw, None) for raw in raws]
    np.testing.assert_allclose(
        results["darken"]["probabilities"], evaluation.predict_rgb(model, darkened), atol=ATOL
    )
    # Image i's noise comes from default_rng((seed, index of "noise", i)): the same whatever
    # the chunking and the other conditions asked for, different for another seed.
    key = list(PERTURBATIONS).index("noise")
    noisy = [
        PERTURBATIONS["noise"](raw, np.random.default_rng((0, key, i)))
        for i, raw in enumerate(raws)
    ]
    np.testing.assert_allclose(
        results["noise"]["probabilities"], evaluation.predict_rgb(model, noisy), atol=ATOL
    )
    alone = evaluation.evaluate_manifest(model, manifest, perturbations="noise", batch_size=2)
    np.testing.assert_array_equal(
        alone["noise"]["probabilities"], results["noise"]["probabilities"]
    )
    reseeded = evaluation.evaluate_manifest(
        model, manifest, perturbations="noise", seed=1, batch_size=2
    )
    difference = reseeded["noise"]["probabilities"] - results["noise"]["probabilities"]
    assert np.abs(difference).max() > 1e-6
    with pytest.raises(ValueError, match="unsupported perturbations \\['fog'\\]; expected"):
        evaluation.evaluate_manifest(model, manifest, perturbations=("clean", "fog"))
    with pytest.raises(ValueError, match="unsupported split"):
        evaluation.evaluate_manifest(model, manifest, split="holdout")


def test_evaluate_manifest_names_missing_raw_files(model, small_processed, dataset_copy):
    manifest = small_processed / "manifest.csv"
    first = next(r for r in read_manifest(manifest) if r["split"] == "test")
    (dataset_copy / first["path"]).unlink()
    with pytest.raises(ValueError, match=r"1 of the \d+ test images .* missing") as caught:
        evaluation.evaluate_manifest(model, manifest, dataset_root=dataset_copy)
    assert first["path"] in str(caught.value)
    with pytest.raises(ValueError, match="is not a folder"):
        evaluation.evaluate_manifest(model, manifest, dataset_root=dataset_copy / "absent")


# ---------------------------------------------------------------------------------------------
# Grad-CAM


def test_grad_cam_is_the_class_activation_map_at_the_input_size(model):
    rgb = _smears((80,))[0]
    x = build_transform(False, model.spec.mean, model.spec.std)(
        torch.from_numpy(evaluation.model_input(model, rgb)).permute(2, 0, 1)[None]
    ).to(model.device)
    with torch.inference_mode():
        features, logits = gradcam.features_and_logits(model.classifier, x)
        torch.testing.assert_close(logits, model.classifier(x), atol=1e-5, rtol=0)
    assert features.ndim == 4
    # With global average pooling and a linear head, dy_t/dA_cij = W_tc / (h w): Grad-CAM is
    # the CAM of Zhou et al., ReLU(sum_c W_tc A_c), up to the normalisation.
    weight = model.classifier.head.weight.detach().cpu().numpy()
    maps = features[0].cpu().numpy()
    for target in range(4):
        cam = gradcam.grad_cam(model, rgb, target)
        assert cam.shape == (64, 64) and cam.min() >= 0 and cam.max() <= 1
        reference = np.maximum(np.tensordot(weight[target], maps, axes=1), 0)
        reference = cv2.resize(reference.astype(np.float32), (64, 64))
        if reference.max() > 0:
            np.testing.assert_allclose(cam, reference / reference.max(), atol=1e-4)
            assert cam.max() == pytest.approx(1.0)
        else:
            assert not cam.any()
    predicted = int(logits.argmax())
    np.testing.assert_array_equal(
        gradcam.grad_cam(model, rgb), gradcam.grad_cam(model, rgb, predicted)
    )
    with pytest.raises(ValueError, match=r"target must be a class index in \[0, 4\), got 4"):
        gradcam.grad_cam(model, rgb, 4)


def test_gradcam_figure_has_a_row_per_class(model):
    samples = [(rgb, i % 4) for i, rgb in enumerate(_smears((64, 72, 80, 64, 56, 64, 64, 64)))]
    fig = gradcam.gradcam_figure(model, samples)
    assert isinstance(fig, Figure) and len(fig.axes) == 4 * 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "true: Benign" and titles[1].startswith("pred: ")
    fig.savefig(io.BytesIO(), format="png")
    with pytest.raises(ValueError, match="at least one"):
        gradcam.gradcam_figure(model, [])


# ---------------------------------------------------------------------------------------------
# The tracked step


def test_run_evaluation_logs_one_finished_run(tracking_uri, tmp_path, monkeypatch, small_processed):
    monkeypatch.chdir(tmp_path)
    classifier = _classifier()
    with mlflow.start_run() as train_run:  # what a training run leaves: checkpoint/
        spec = _spec(classifier)
        tracking.log_checkpoint(classifier, spec)
    source = f"runs:/{train_run.info.run_id}/checkpoint"
    manifest = small_processed / "manifest.csv"

    # A bad source fails before any run starts.
    with pytest.raises(ValueError, match="not found"):
        evaluate_step.run(f"runs:/{'0' * 32}", manifest, experiment="evaluate-test")
    assert mlflow.get_experiment_by_name("evaluate-test") is None

    result = evaluate_step.run(
        source, manifest, bootstrap=200, gradcam_per_class=1, experiment="evaluate-test"
    )
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["step"] == "evaluate" and run.data.tags["split"] == "test"
    assert run.data.tags["model_uri"] == source
    logged = run.data.metrics
    assert logged["test_accuracy"] == pytest.approx(result["accuracy"])
    assert logged["test_f1_macro"] == pytest.approx(result["f1_macro"])
    for metric in ("accuracy", "f1_macro"):
        low, high = logged[f"test_{metric}_ci_low"], logged[f"test_{metric}_ci_high"]
        assert (low, high) == pytest.approx(result[f"{metric}_ci"])
        assert low <= logged[f"test_{metric}"] <= high

    rows = [r for r in read_manifest(manifest) if r["split"] == "test"]
    root = Path(json.loads((small_processed / "params.json").read_text())["dataset_root"])
    model = evaluate_step.load_model(source)
    probabilities = evaluation.predict_rgb(
        model, [images.read_image(root / r["path"]) for r in rows]
    )
    labels = np.array([CLASSES.index(r["class"]) for r in rows])
    assert result["n_images"] == len(rows)
    assert logged["test_accuracy"] == pytest.approx(np.mean(probabilities.argmax(1) == labels))
    true_class = probabilities[np.arange(len(labels)), labels]
    assert logged["test_loss"] == pytest.approx(-np.mean(np.log(true_class)), rel=1e-6)

    table = {row["condition"]: row for row in result["robustness"]}
    assert list(table) == list(PERTURBATIONS) and table["clean"]["accuracy_drop"] == 0
    for name in list(PERTURBATIONS)[1:]:
        assert logged[f"robust_{name}_accuracy"] == pytest.approx(table[name]["accuracy"])
        assert logged[f"robust_{name}_f1_macro"] == pytest.approx(table[name]["f1_macro"])
        drop = table["clean"]["accuracy"] - table[name]["accuracy"]
        assert table[name]["accuracy_drop"] == pytest.approx(drop)

    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    for name in ("robustness.json", "robustness.csv", "gradcam.png", "predictions.csv"):
        assert f"evaluation/{name}" in artifacts
    local = Path(client.download_artifacts(run.info.run_id, "evaluation", str(tmp_path / "out")))
    csv = pd.read_csv(local / "robustness.csv")
    assert list(csv.columns) == [
        "condition",
        "accuracy",
        "f1_macro",
        "roc_auc_macro",
        "ece",
        "accuracy_drop",
    ]
    assert csv["condition"].tolist() == list(PERTURBATIONS)
    assert (
        json.loads((local / "robustness.json").read_text())["conditions"][0]["condition"] == "clean"
    )
    predictions = pd.read_csv(local / "predictions.csv")
    assert predictions["path"].tolist() == [r["path"] for r in rows]
    # The table view's misclassified images: every wrong one, most confident first, each with
    # its model input and Grad-CAM as images of the run.
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    assert len(wrong) > 0  # an untrained network: plenty
    confidence = probabilities[wrong, predicted[wrong]]
    expected = [rows[i]["path"] for i in wrong[np.argsort(-confidence, kind="stable")]]
    table = json.loads((local / "misclassified.json").read_text())
    assert table["columns"] == ["path", "true", "predicted", "confidence", "image", "gradcam"]
    assert [row[0] for row in table["data"]] == expected[: evaluate_step.MAX_MISCLASSIFIED]
    assert all(row[1] != row[2] for row in table["data"])
    stored = {f.path for f in client.list_artifacts(run.info.run_id, "table_images/evaluation")}
    assert stored == {"table_images/evaluation/misclassified"}
    cell = table["data"][0][5]
    assert cell["type"] == "image" and cell["filepath"].endswith(".png")

    # Clean only, no intervals, no figure: none of their metrics or artifacts.
    plain = evaluate_step.run(source, manifest, robustness=False, bootstrap=0, gradcam_per_class=0)
    assert plain["accuracy_ci"] is None and [r["condition"] for r in plain["robustness"]] == [
        "clean"
    ]
    run = client.get_run(plain["run_id"])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("robust_") or "_ci_" in k]
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/predictions.csv" in artifacts and "evaluation/gradcam.png" not in artifacts
