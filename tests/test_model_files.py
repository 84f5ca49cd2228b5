"""Model files are data: a payload planted in any file of a logged model never runs in predict,
evaluate or serve; they refuse the file or ignore it."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from leukemia import images, model_files, serving, synthetic
from leukemia.cli import main
from leukemia.data import CLASSES
from leukemia.model import create_classifier
from leukemia.model_files import ModelFileError, ModelSpec
from leukemia.segmentation import SegmentationParams
from leukemia.steps import evaluate as evaluate_step

from .conftest import forget_experiment

SEG = SegmentationParams(image_size=64)


class _Payload:
    """Unpickling this runs ``code``: what a replaced pickle in a model folder would do."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def _payloads(marker: Path) -> dict[str, bytes]:
    """Ways to carry code, one per kind of file."""
    return {
        "pickle": pickle.dumps(_Payload(_code(marker))),
        "python": f"import builtins\n{_code(marker)}\n".encode(),
        "yaml": f'!!python/object/apply:builtins.exec ["{_code(marker)}"]\n'.encode(),
    }


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A served model logged once, downloaded to a folder: (classifier, folder)."""
    root = tmp_path_factory.mktemp("logged")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        forget_experiment()
        mlflow.set_tracking_uri(uri)
        try:
            torch.manual_seed(0)
            classifier = create_classifier(
                "test_efficientnet", num_classes=4, dropout=0.2, pretrained="none"
            ).eval()
            cfg = classifier.backbone.pretrained_cfg
            spec = ModelSpec.for_classifier(
                classifier,
                model_name="test_efficientnet",
                dropout=0.2,
                mean=cfg["mean"],
                std=cfg["std"],
                segmentation=SEG,
            )
            info = serving.log_served_model(classifier, spec)
            folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(root)))
        finally:
            forget_experiment()
            mlflow.set_tracking_uri(None)
    return classifier, folder


def _request(n: int = 2) -> pd.DataFrame:
    rgbs = [synthetic.make_image(1, CLASSES[i % 4], i, 64)[0] for i in range(n)]
    values = [base64.b64encode(images.encode_png(rgb)).decode("ascii") for rgb in rgbs]
    return pd.DataFrame({"image": values})


def _attempt(action) -> str:
    """Run ``action``; 'refused' when it raises an exception, 'ignored' when it predicts."""
    try:
        action()
    except Exception:  # noqa: BLE001 - any refusal will do, as long as nothing ran
        return "refused"
    return "ignored"


def test_the_logged_model_holds_only_data_files(logged):
    _, folder = logged
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "data/model/weights.safetensors" in names and "data/model/model.json" in names
    assert not [n for n in names if n.endswith((".py", ".pkl", ".pth", ".pt", ".cloudpickle"))]
    mlmodel = (folder / "MLmodel").read_text()
    assert "loader_module: leukemia.serving" in mlmodel and "python_model" not in mlmodel
    assert "code:" not in mlmodel.replace("code: null", "")


def _three_paths(folder: Path, image: Path) -> dict[str, str]:
    """What evaluate, predict and serve make of a model folder."""
    return {
        "evaluate": _attempt(lambda: evaluate_step.load_model(str(folder))),
        "predict": _attempt(
            lambda: _ok(
                CliRunner().invoke(main, ["predict", str(image), "--model-uri", str(folder)])
            )
        ),
        # What `mlflow models serve` does with the folder, in this process.
        "serve": _attempt(lambda: mlflow.pyfunc.load_model(str(folder)).predict(_request())),
    }


def test_a_payload_in_any_file_never_runs(logged, tmp_path):
    _, original = logged
    image = tmp_path / "cell.png"
    image.write_bytes(base64.b64decode(_request(1)["image"][0]))
    marker, folder = tmp_path / "marker", tmp_path / "model"
    files = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file())
    outcomes = {}
    for relative in files:
        for kind, payload in _payloads(marker).items():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(original, folder)
            (folder / relative).write_bytes(payload)
            result = _three_paths(folder, image)
            assert not marker.exists(), f"a {kind} payload in {relative} ran: {result}"
            outcomes[(str(relative), kind)] = result
    # The model's own data files are refused when tampered with, by all three paths.
    for name in ("data/model/weights.safetensors", "data/model/model.json"):
        for kind in ("pickle", "python", "yaml"):
            assert set(outcomes[(name, kind)].values()) == {"refused"}, (name, kind)
    # MLflow's own description refuses a YAML payload (safe_load); ours never reads it.
    assert outcomes[("MLmodel", "yaml")]["serve"] == "refused"
    assert outcomes[("MLmodel", "yaml")]["evaluate"] == "ignored"


def _ok(result) -> None:
    if result.exit_code != 0:
        raise RuntimeError(result.output)


def test_code_planted_beside_an_old_format_model_is_ignored(logged, tmp_path):
    """Models logged before this format kept the two files in artifacts/ and a served_model.py
    that MLflow ran: predict and evaluate read the data files and never the code."""
    classifier, original = logged
    marker = tmp_path / "marker"
    folder = tmp_path / "old"
    (folder / "artifacts").mkdir(parents=True)
    for name in (model_files.WEIGHTS_FILE, model_files.SPEC_FILE):
        shutil.copy(original / "data" / "model" / name, folder / "artifacts" / name)
    (folder / "served_model.py").write_text(_payloads(marker)["python"].decode())
    (folder / "python_model.pkl").write_bytes(_payloads(marker)["pickle"])
    model = evaluate_step.load_model(str(folder))
    assert model.predict(_request()).shape == (2, 5)
    image = tmp_path / "cell.png"
    image.write_bytes(base64.b64decode(_request(1)["image"][0]))
    result = CliRunner().invoke(main, ["predict", str(image), "--model-uri", str(folder)])
    assert result.exit_code == 0, result.output
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model": "hf-hub:someone/model"}, "unknown timm model"),
        ({"model": 7}, "model must be a timm model name"),
        ({"dropout": "0.2"}, "dropout must be a finite number"),
        ({"num_classes": 3}, "4 class names for 3 outputs"),
        ({"mean": [0.5, 0.5]}, "mean needs 3 values"),
        ({"std": [0.0, 1.0, 1.0]}, "std must be in"),
        ({"max_pixels": -1}, "max_pixels must be an integer"),
        ({"segmentation": {"kernel_size": 4}}, "kernel_size must be an odd integer"),
        ({"segmentation": {"stain_norm": "reinhard"}}, "stain_norm reinhard but no stain_ref"),
        (
            {"segmentation": {"stain_norm": "reinhard", "stain_reference": [1, 2, 3]}},
            "stain reference of 6 finite numbers",
        ),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"exposure_norm": "yes"}, "exposure_norm must be true or false"),
    ],
)
def test_model_json_is_checked_before_use(logged, tmp_path, change, reason):
    _, original = logged
    folder = tmp_path / "model"
    shutil.copytree(original / "data" / "model", folder)
    spec = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**spec, **change}))
    with pytest.raises(ModelFileError, match=reason) as caught:
        model_files.load(folder)
    assert "\n" not in str(caught.value)


def test_spec_round_trip_and_corrupt_weights(logged, tmp_path):
    classifier, original = logged
    folder = tmp_path / "model"
    shutil.copytree(original / "data" / "model", folder)
    loaded, spec = model_files.load(folder)
    assert isinstance(spec, ModelSpec) and spec.classes == tuple(CLASSES)
    assert ModelSpec.from_json(spec.to_json()) == spec
    for name, tensor in classifier.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    weights = folder / model_files.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        model_files.load(folder)
    (folder / "model.json").write_text("[" * 100_000)
    with pytest.raises(ModelFileError, match="not readable JSON"):
        model_files.read_spec(folder)


@pytest.mark.slow
def test_mlflow_models_serve_refuses_a_pickle_in_place_of_the_weights(logged, tmp_path):
    _, original = logged
    marker = tmp_path / "marker"
    folder = tmp_path / "model"
    shutil.copytree(original, folder)
    (folder / "data" / "model" / model_files.WEIGHTS_FILE).write_bytes(_payloads(marker)["pickle"])
    venv_bin = Path(sys.executable).parent
    done = subprocess.run(
        [
            venv_bin / "mlflow",
            "models",
            "serve",
            "-m",
            str(folder),
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "-p",
            "0",
        ],
        env={**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode != 0
    assert "not a readable safetensors file" in done.stdout + done.stderr
    assert not marker.exists()


def test_the_temperature_is_data_and_older_files_load_uncalibrated(logged, tmp_path):
    """model.json's temperature (fitted in training) divides the logits; a file written before
    it existed loads with T = 1; a bad value is refused."""
    classifier, original = logged
    folder = tmp_path / "model"
    shutil.copytree(original / "data" / "model", folder)
    values = json.loads((folder / model_files.SPEC_FILE).read_text())
    values.pop("temperature", None)
    (folder / model_files.SPEC_FILE).write_text(json.dumps(values))
    from leukemia.inference import LeukemiaModel

    plain = LeukemiaModel.from_folder(folder).predict(_request(3))
    assert model_files.read_spec(folder).temperature == 1.0
    (folder / model_files.SPEC_FILE).write_text(json.dumps({**values, "temperature": 2.0}))
    scaled = LeukemiaModel.from_folder(folder).predict(_request(3))
    columns = [c for c in plain.columns if c.startswith("prob_")]
    from leukemia.metrics import temperature_scaled

    np.testing.assert_allclose(
        scaled[columns].to_numpy(), temperature_scaled(plain[columns].to_numpy(), 2.0), atol=1e-9
    )
    assert (scaled["label"] == plain["label"]).all()
    (folder / model_files.SPEC_FILE).write_text(json.dumps({**values, "temperature": 0}))
    with pytest.raises(ModelFileError, match=r"temperature must be in \[0.01, 100.0\]"):
        model_files.read_spec(folder)


def test_exposure_norm_travels_with_the_model_and_undoes_exposure(tmp_path):
    """The exposure-norm arm's operation is part of the network: written to model.json, rebuilt
    on load, and an image scaled by 0.6 (nothing saturates) gives the same logits; without it,
    not. A file written before the field existed loads without it."""
    from leukemia.model import create_classifier

    torch.manual_seed(0)
    classifier = create_classifier(
        "test_efficientnet", pretrained="none", exposure_norm=True
    ).eval()
    spec = ModelSpec.for_classifier(
        classifier, model_name="test_efficientnet", dropout=0.4, mean=(0.5,) * 3,
        std=(0.5,) * 3, segmentation={},
    )  # fmt: skip
    assert spec.exposure_norm is True
    model_files.write(tmp_path, classifier, spec)
    loaded, read = model_files.load(tmp_path)
    assert read.exposure_norm and loaded.exposure_norm
    mean = torch.tensor(classifier.backbone.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(classifier.backbone.pretrained_cfg["std"]).view(1, 3, 1, 1)
    intensity = torch.rand(2, 3, 64, 64) * 0.5 + 0.2
    normalised = [(intensity * a - mean) / std for a in (1.0, 0.6)]
    with torch.no_grad():
        same = [loaded(x) for x in normalised]
        plain = create_classifier("test_efficientnet", pretrained="none").eval()
        plain.load_state_dict(loaded.state_dict())
        differ = [plain(x) for x in normalised]
    torch.testing.assert_close(same[0], same[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(differ[0], differ[1], atol=1e-3)
    values = json.loads((tmp_path / model_files.SPEC_FILE).read_text())
    values.pop("exposure_norm")
    (tmp_path / model_files.SPEC_FILE).write_text(json.dumps(values))
    assert model_files.read_spec(tmp_path).exposure_norm is False
