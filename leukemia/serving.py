"""The served model as an MLflow pyfunc: ``inference.LeukemiaModel`` behind MLflow's signature,
with client errors as HTTP 400.

Files, written by ``log_served_model`` (see ``model_files``): ``data/model/weights.safetensors``
and ``data/model/model.json`` beside MLflow's ``MLmodel``, whose ``python_function`` flavor
names this module as its ``loader_module``. MLflow imports it from the installed ``leukemia``
package and calls ``_load_pyfunc(data path)``: no pickle and no code file is stored with the
model, so loading it runs nothing that came with it.

What ``mlflow models serve`` receives: ``{"dataframe_split": {"columns": ["image"], "data":
[[b64], ...]}}``. A malformed request raises ``MlflowException`` with
``INVALID_PARAMETER_VALUE``; MLflow's scoring server answers it with HTTP 400 and
``{"error_code": "INVALID_PARAMETER_VALUE", "message": "Failed to predict data '<the
DataFrame>'. Error: <message>", ...}`` (``ERROR_CODE_TO_HTTP_STATUS`` in
``mlflow/exceptions.py``). The pyfunc wrapper checks a DataFrame against the signature (one
string column ``image``) before ``predict`` runs, so arrays reach ``predict`` only through
``mlflow.pyfunc.load_model(uri).get_raw_model().predict(array)``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema

from . import images, model_files, yamlfile
from .data import CLASSES, prob_column
from .inference import IMAGE_COLUMN, InvalidRequest, LeukemiaModel
from .model import Classifier
from .model_files import ModelSpec

# What the served model imports. Listed rather than inferred: MLflow's inference loads the
# model in a subprocess, which costs seconds per log_model.
_REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "numpy",
    "pandas",
    "opencv-python-headless",
    "pillow",
)


class ServedModel(LeukemiaModel):
    """``LeukemiaModel`` whose client errors are MLflow's INVALID_PARAMETER_VALUE (HTTP 400)."""

    def predict(self, model_input: pd.DataFrame | np.ndarray, params=None) -> pd.DataFrame:
        try:
            return super().predict(model_input, params)
        except InvalidRequest as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None


# ---------------------------------------------------------------------------------------------
# Logging


def served_signature(classes: Sequence[str]) -> ModelSignature:
    """Input: a string column ``image``; output: ``label`` and a double ``prob_<class>`` each."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema(
            [ColSpec(DataType.string, "label")]
            + [ColSpec(DataType.double, prob_column(name)) for name in classes]
        ),
    )


def example_request(size: int = 64) -> pd.DataFrame:
    """One synthetic smear as a base64 PNG: small, so MLflow's check that the example serves
    (one prediction when logging) stays quick."""
    from .synthetic import make_image

    rgb, _ = make_image(0, CLASSES[0], 0, size)
    png = images.encode_png(rgb)
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(png).decode("ascii")]})


def _pinned_requirements() -> list[str]:
    # Local version labels (torch's "+cpu") are not on PyPI; MLflow drops them the same way.
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in _REQUIREMENTS]


def log_served_model(
    classifier: Classifier,
    spec: ModelSpec,
    *,
    name: str = "classifier",
    registered_model_name: str | None = None,
    input_example: pd.DataFrame | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log ``classifier`` with its preprocessing (``spec``) as a pyfunc, in the active run if
    any. The ``leukemia`` package must be importable where the model is loaded. Returns MLflow's
    ``ModelInfo`` (``model_uri``, and ``registered_model_version`` when
    ``registered_model_name`` is given)."""
    with tempfile.TemporaryDirectory(prefix="leukemia-serving-") as scratch:
        folder = Path(scratch, "model")  # stored as data/model
        folder.mkdir()
        model_files.write(folder, classifier, spec)
        return mlflow.pyfunc.log_model(
            name=name,
            loader_module=__name__,
            data_path=str(folder),
            signature=served_signature(list(spec.classes)),
            input_example=example_request() if input_example is None else input_example,
            registered_model_name=registered_model_name,
            pip_requirements=_pinned_requirements(),
        )


def _load_pyfunc(data_path: str) -> ServedModel:
    """MLflow's entry into a served model (``loader_module``): ``data_path`` is the model's
    ``data/model`` folder."""
    return ServedModel.from_folder(data_path)


# ---------------------------------------------------------------------------------------------
# Serving: only a folder in this format

# Every file a model folder logged by ``log_served_model`` holds (MLflow adds
# registered_model_meta when it downloads a registered version), with its largest size.
_SMALL = 16 << 20
SERVED_FILES = {
    "MLmodel": model_files.MAX_SPEC_BYTES,
    "conda.yaml": model_files.MAX_SPEC_BYTES,
    "python_env.yaml": model_files.MAX_SPEC_BYTES,
    "requirements.txt": model_files.MAX_SPEC_BYTES,
    "input_example.json": _SMALL,
    "serving_input_example.json": _SMALL,
    "registered_model_meta": model_files.MAX_SPEC_BYTES,
    f"data/model/{model_files.WEIGHTS_FILE}": model_files.MAX_WEIGHTS_BYTES,
    f"data/model/{model_files.SPEC_FILE}": model_files.MAX_SPEC_BYTES,
}
# The python_function flavor's keys that MLflow may write for a loader_module model.
_FLAVOR_KEYS = {"loader_module", "data", "code", "env", "python_version", "streamable"}


def check_mlmodel(path: str | os.PathLike, source: str) -> None:
    """Refuse an ``MLmodel`` that would make MLflow run anything but this module: exactly one
    flavor, ``python_function``, whose ``loader_module`` is ``leukemia.serving`` with data in
    ``data/model``, and no code paths, python model, artifacts or model config."""
    where = f"MLmodel of {source!r}"
    raw = model_files.read_regular(path, model_files.MAX_SPEC_BYTES, where)
    try:
        described = yamlfile.loads(raw.decode("utf-8"), where)
    except (UnicodeDecodeError, ValueError) as error:
        raise model_files.ModelFileError(f"{where} is not readable: {error}") from None
    flavors = described.get("flavors") if isinstance(described, dict) else None
    if not isinstance(flavors, dict) or set(flavors) != {"python_function"}:
        named = sorted(flavors) if isinstance(flavors, dict) else flavors
        raise model_files.ModelFileError(
            f"{where} names the flavors {named!r}; expected only python_function (a model "
            "logged by leukemia train)"
        )
    flavor = flavors["python_function"]
    if not isinstance(flavor, dict):
        raise model_files.ModelFileError(f"{where}: python_function must be a mapping")
    expected = {"loader_module": __name__, "data": "data/model", "code": None}
    wrong = {k: flavor.get(k) for k, v in expected.items() if flavor.get(k) != v}
    unknown = sorted(set(flavor) - _FLAVOR_KEYS)
    if wrong or unknown:
        raise model_files.ModelFileError(
            f"{where} has python_function {wrong or ''}"
            f"{' and keys ' + str(unknown) if unknown else ''}"
            f"; expected loader_module {__name__}, data data/model and no code, python_model "
            "or artifacts: leukemia serves only models in its own format"
        )


@contextlib.contextmanager
def served_copy(source: str) -> Iterator[Path]:
    """A private, checked copy of the served model ``source`` (a model URI or a folder holding
    ``MLmodel``), for ``mlflow.pyfunc.load_model``: only the files ``SERVED_FILES`` names,
    regular and within their sizes, and an ``MLmodel`` whose only loader is this module
    (``check_mlmodel``). ``mlflow models serve`` itself imports whatever an ``MLmodel`` names;
    this is what ``leukemia serve`` adds. Removed on exit. Raises ``ValueError``."""
    from . import model_uri

    with tempfile.TemporaryDirectory(prefix="leukemia-serve-") as scratch:
        download = Path(scratch, "download")
        download.mkdir()
        local, _ = model_uri.resolve(source, download)
        if not Path(local, "MLmodel").is_file():
            raise model_files.ModelFileError(
                f"{source!r} holds no MLmodel; expected a served model (models:/NAME@ALIAS, "
                "runs:/RUN_ID/classifier, or a folder downloaded from one)"
            )
        copy = model_files.copy_checked(local, Path(scratch, "model"), SERVED_FILES)
        check_mlmodel(copy / "MLmodel", source)
        model_files.read_spec(copy / "data" / "model", source)  # a clear line before MLflow
        yield copy
