"""The served pyfunc: same answers as the bare classifier, client errors for bad requests, and
HTTP 400 (not 500) from ``mlflow models serve``."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from leukemia import inference, model_files, serving, synthetic
from leukemia.data import CLASSES
from leukemia.datasets import build_transform
from leukemia.model import create_classifier
from leukemia.model_files import ModelSpec
from leukemia.segmentation import SegmentationParams, preprocess_image

from .conftest import forget_experiment, free_port

SEG = SegmentationParams(image_size=64)
MAX_PIXELS = 100 * 100  # small, so that an oversized image is cheap to make
PROB_COLUMNS = ["prob_benign", "prob_early_pre_b", "prob_pre_b", "prob_pro_b"]
# Where the served model runs; the reference runs there too (cuDNN's TF32 convolutions differ
# from the CPU's by more than the tolerance).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _classifier():
    torch.manual_seed(0)
    model = create_classifier("test_efficientnet", num_classes=4, dropout=0.2, pretrained="none")
    return model.to(DEVICE)


def _spec(classifier, classes=CLASSES) -> ModelSpec:
    cfg = classifier.backbone.pretrained_cfg
    return ModelSpec.for_classifier(
        classifier,
        model_name="test_efficientnet",
        dropout=0.2,
        mean=cfg["mean"],
        std=cfg["std"],
        segmentation=SEG,
        classes=classes,
        max_pixels=MAX_PIXELS,
    )


def _log(classifier, **kwargs):
    return serving.log_served_model(classifier, _spec(classifier), **kwargs)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(bare classifier in eval mode, the logged model loaded with mlflow.pyfunc.load_model).

    Logged once for the module's fast tests, in a private SQLite store as ``tracking_uri`` makes.
    """
    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # MLflow puts a SQLite store's artifacts under ./mlruns
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        forget_experiment()
        mlflow.set_tracking_uri(uri)
        try:
            classifier = _classifier()
            model_info = _log(classifier)
            loaded = mlflow.pyfunc.load_model(model_info.model_uri)
        finally:
            forget_experiment()
            mlflow.set_tracking_uri(None)
    return classifier.eval(), loaded


def _smear(index: int, size: int) -> np.ndarray:
    return synthetic.make_image(3, CLASSES[index % 4], index, size)[0]


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", rgb[:, :, ::-1])[1].tobytes()


def _jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _reference_probs(classifier, rgbs, mean, std) -> np.ndarray:
    """The bare classifier on images preprocessed by hand, as the training Dataset does."""
    transform = build_transform(False, mean, std)
    batch = torch.stack(
        [transform(torch.from_numpy(preprocess_image(rgb, SEG)).permute(2, 0, 1)) for rgb in rgbs]
    )
    with torch.inference_mode():
        return torch.softmax(classifier(batch.to(DEVICE)), dim=1).double().cpu().numpy()


def _check_output(output: pd.DataFrame, expected: np.ndarray) -> None:
    assert list(output.columns) == ["label", *PROB_COLUMNS]
    probs = output[PROB_COLUMNS].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    assert list(output["label"]) == [CLASSES[i] for i in expected.argmax(axis=1)]


def test_served_model_matches_the_bare_classifier(served):
    classifier, loaded = served
    cfg = classifier.backbone.pretrained_cfg
    rgbs = [_smear(i, size) for i, size in enumerate((80, 64, 48, 96, 80))]
    files = [_png(rgbs[0]), _jpeg(rgbs[1]), _png(rgbs[2]), _jpeg(rgbs[3]), _png(rgbs[4])]
    # str and bytes base64 values; the last one wrapped into lines, as `base64` writes it
    values = [_b64(files[0]), _b64(files[1]).encode(), _b64(files[2]), _b64(files[3])]
    values.append(base64.encodebytes(files[4]).decode("ascii"))
    # JPEG is lossy: the reference sees what OpenCV decodes; PNG gives back the pixels.
    jpegs = [cv2.imdecode(np.frombuffer(files[i], np.uint8), cv2.IMREAD_COLOR) for i in (1, 3)]
    reference = [rgbs[0], jpegs[0][:, :, ::-1], rgbs[2], jpegs[1][:, :, ::-1], rgbs[4]]
    output = loaded.predict(pd.DataFrame({"image": values}))
    _check_output(output, _reference_probs(classifier, reference, cfg["mean"], cfg["std"]))

    # In process, RGB arrays skip the decoding (the signature admits DataFrames only).
    model = loaded.get_raw_model()
    batch = np.stack([_smear(i, 72) for i in range(3)])
    expected = _reference_probs(classifier, batch, cfg["mean"], cfg["std"])
    _check_output(model.predict(batch), expected)
    _check_output(model.predict(batch[1]), expected[1:2])


def test_empty_request_gives_an_empty_table(served):
    _, loaded = served
    output = loaded.get_raw_model().predict(np.zeros((0, 8, 8, 3), np.uint8))
    assert list(output.columns) == ["label", *PROB_COLUMNS] and len(output) == 0


def test_more_than_one_chunk_keeps_the_input_order(served):
    classifier, loaded = served
    cfg = classifier.backbone.pretrained_cfg
    rgbs = [_smear(i, 64) for i in range(2 * loaded.get_raw_model().batch_size + 3)]
    output = loaded.predict(pd.DataFrame({"image": [_b64(_png(rgb)) for rgb in rgbs]}))
    _check_output(output, _reference_probs(classifier, rgbs, cfg["mean"], cfg["std"]))


TINY_PNG = _png(np.zeros((8, 8, 3), np.uint8))
MALFORMED_FRAMES = {
    "not base64": (pd.DataFrame({"image": ["%%% not base64 %%%"]}), "not valid base64"),
    "not an image": (pd.DataFrame({"image": [_b64(b"hello, world")]}), "not an image"),
    "raw bytes": (pd.DataFrame({"image": [TINY_PNG]}), "expected them base64-encoded"),
    "too large": (
        pd.DataFrame({"image": [_b64(TINY_PNG), _b64(_png(np.zeros((101, 100, 3), np.uint8)))]}),
        "row 1 of column 'image': 100x101 = 10100 pixels exceeds the limit of 10000",
    ),
    "empty": (pd.DataFrame({"image": [""]}), "empty file"),
}


@pytest.mark.parametrize("case", list(MALFORMED_FRAMES))
def test_malformed_dataframes_are_client_errors(served, case):
    frame, reason = MALFORMED_FRAMES[case]
    with pytest.raises(MlflowException) as caught:
        served[1].predict(frame)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.get_http_status_code() == 400
    assert reason in caught.value.message
    assert "expected" in caught.value.message and "\n" not in caught.value.message


def test_missing_image_column_names_the_columns_received(served):
    _, loaded = served
    frame = pd.DataFrame({"picture": [_b64(TINY_PNG)]})
    # MLflow's schema check answers first, through the pyfunc wrapper ...
    with pytest.raises(MlflowException, match=r"missing inputs \['image'\].*\['picture'\]") as e:
        loaded.predict(frame)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    # ... and the model itself when called directly.
    with pytest.raises(MlflowException, match=r"column 'image'.*got columns \['picture'\]") as e:
        loaded.get_raw_model().predict(frame)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), "got dtype float32 and shape (2, 8, 8, 3)"),
        (np.zeros((8, 8), np.uint8), "got dtype uint8 and shape (8, 8)"),
        (np.zeros((2, 8, 8, 4), np.uint8), "got dtype uint8 and shape (2, 8, 8, 4)"),
        (np.zeros((1, 0, 8, 3), np.uint8), "H, W >= 1"),
        (np.zeros((1, 101, 100, 3), np.uint8), "at most 10000 pixels, got 100x101"),
    ],
)
def test_malformed_arrays_are_client_errors(served, array, reason):
    with pytest.raises(MlflowException) as caught:
        served[1].get_raw_model().predict(array)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert reason in caught.value.message and "expected" in caught.value.message


def test_other_input_types_are_client_errors(served):
    with pytest.raises(MlflowException, match="expected a DataFrame .* got list") as caught:
        served[1].get_raw_model().predict([[1, 2, 3]])
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_decode_base64_accepts_lines_and_rejects_the_rest():
    data = bytes(range(256)) * 4
    assert inference.decode_base64(base64.encodebytes(data), 0) == data
    assert inference.decode_base64(_b64(data), 0) == data
    with pytest.raises(inference.InvalidRequest, match="row 7 .* got float"):
        inference.decode_base64(float("nan"), 7)


def test_log_served_model_writes_a_registered_self_describing_model(
    tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    classifier = _classifier()
    model_info = _log(classifier, registered_model_name="leukemia-test")
    assert model_info.registered_model_version == 1
    signature = model_info.signature
    assert signature.inputs.input_names() == ["image"]
    assert signature.outputs.input_names() == ["label", *PROB_COLUMNS]
    assert [t.name for t in signature.outputs.input_types()] == ["string"] + ["double"] * 4

    local = Path(mlflow.artifacts.download_artifacts(model_info.model_uri, dst_path=tmp_path))
    config = json.loads((local / "data" / "model" / "model.json").read_text())
    cfg = classifier.backbone.pretrained_cfg
    assert config == {
        "model": "test_efficientnet",
        "dropout": 0.2,
        "num_classes": 4,
        "classes": list(CLASSES),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "segmentation": SEG.to_dict(),
        "max_pixels": MAX_PIXELS,
        "temperature": 1.0,
        "exposure_norm": False,
    }
    from safetensors.torch import load_file

    weights = load_file(str(local / "data" / "model" / "weights.safetensors"))
    assert weights.keys() == classifier.state_dict().keys()
    assert torch.equal(weights["head.weight"], classifier.head.weight.detach())
    assert (local / "serving_input_example.json").is_file()


def test_log_served_model_checks_its_arguments(tracking_uri):
    with pytest.raises(ValueError, match="3 class names for 4 outputs"):
        _spec(_classifier(), classes=("a", "b", "c"))
    with pytest.raises(ValueError, match=r"unknown segmentation keys \['size'\]"):
        model_files.segmentation_params({"size": 64})


# ---------------------------------------------------------------------------------------------
# mlflow models serve


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_for_ping(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited ({server.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused while starting, or not yet ready
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping in {timeout} s:\n{log.read_text()}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_images_and_rejects_garbage_with_400(
    tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    classifier = _classifier().eval()
    model_info = _log(classifier, registered_model_name="leukemia-served")
    model_uri = f"models:/leukemia-served/{model_info.registered_model_version}"
    port = free_port()
    log = tmp_path / "server.log"
    venv_bin = Path(sys.executable).parent
    command = [venv_bin / "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as output:
        server = subprocess.Popen(
            command,
            cwd=tmp_path,
            # the server runs `uvicorn` by name: put the venv first on PATH, as activating does
            env={
                **os.environ,
                "MLFLOW_TRACKING_URI": tracking_uri,
                "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            },
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so its workers stop with it
        )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_ping(f"{base}/ping", server, log)

        rgb = _smear(2, 80)
        cfg = classifier.backbone.pretrained_cfg
        expected = _reference_probs(classifier, [rgb], cfg["mean"], cfg["std"])[0]
        request = {"dataframe_split": {"columns": ["image"], "data": [[_b64(_png(rgb))]]}}
        status, body = _post(f"{base}/invocations", request)
        assert status == 200, body
        (prediction,) = body["predictions"]
        assert prediction["label"] == CLASSES[expected.argmax()]
        probs = [prediction[column] for column in PROB_COLUMNS]
        np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)

        garbage = {"dataframe_split": {"columns": ["image"], "data": [["%%% not base64 %%%"]]}}
        status, body = _post(f"{base}/invocations", garbage)
        assert status == 400, body
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "row 0 of column 'image': not valid base64" in body["message"]
        assert "stack_trace" not in body and "Traceback" not in body["message"]
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (mlflow, uvicorn and its worker), SIGKILL if slow."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:  # already gone
            pass
        try:
            server.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def test_per_request_limits_refuse_before_decoding(served, monkeypatch):
    raw = served[1].get_raw_model()
    monkeypatch.setenv(inference.MAX_ROWS_ENV, "3")
    monkeypatch.setenv(inference.MAX_PIXELS_ENV, str(2 * 64 * 64))
    limited = serving.ServedModel(raw.classifier, raw.spec, raw.device)
    small = _b64(_png(_smear(0, 64)))
    assert len(limited.predict(pd.DataFrame({"image": [small, small]}))) == 2
    with pytest.raises(MlflowException, match=r"at most 3 images per request .* got 4") as caught:
        limited.predict(pd.DataFrame({"image": ["%%% not even base64 %%%"] * 4}))
    assert caught.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match=r"at most 8192 pixels .* got 12288"):
        limited.predict(pd.DataFrame({"image": [small] * 3}))
    with pytest.raises(MlflowException, match=r"at most 8192 pixels .* got 12288"):
        limited.predict(np.zeros((3, 64, 64, 3), np.uint8))
    # A huge image is refused from its header: a 12000 x 12000 PNG of a few dozen bytes.
    header = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
    header[16:24] = (12000).to_bytes(4, "big") * 2
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    with pytest.raises(MlflowException, match="pixels per request"):
        limited.predict(pd.DataFrame({"image": [_b64(bytes(header))]}))
    monkeypatch.setenv(inference.MAX_ROWS_ENV, "many")
    with pytest.raises(ValueError, match="LEUKEMIA_SERVE_MAX_ROWS must be a positive integer"):
        serving.ServedModel(raw.classifier, raw.spec, raw.device)
