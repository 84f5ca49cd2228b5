"""Where a model comes from: a ``runs:/`` or ``models:/`` URI, or a folder, resolved to the local
folder holding its files, and the registry version or run an alias or URI names."""

from __future__ import annotations

import os
import re
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

RUN_MODEL = "classifier"  # what runs:/<run_id> means: the served pyfunc of a train run
EXPECTED_SOURCE = (
    "runs:/<run_id>[/<model name>], models:/<name>@<alias>, models:/<name>/<version>, or a "
    "folder holding weights.safetensors and model.json"
)
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(.*)$")


def resolve(source: str, scratch: str | os.PathLike) -> tuple[Path, str]:
    """A model source as a local folder (a URI is downloaded into ``scratch``) and its
    normalised name (``runs:/<id>`` means ``runs:/<id>/classifier``; a path, absolute).
    Raises ``ValueError`` naming what was expected. Evaluate, predict and main use it."""
    source = str(source)
    match = _URI.match(source)
    if match:
        scheme, rest = match.groups()
        if scheme not in ("runs", "models"):
            raise ValueError(f"unsupported model URI {source!r}; expected {EXPECTED_SOURCE}")
        rest = rest.strip("/")
        if not rest:
            raise ValueError(
                f"model URI {source!r} names no run or model; expected {EXPECTED_SOURCE}"
            )
        single = scheme == "runs" and "/" not in rest
        uri = f"runs:/{rest}/{RUN_MODEL}" if single else f"{scheme}:/{rest}"
        try:
            local = _local_artifacts(uri, scratch)
        except MlflowException as error:
            message = " ".join(str(error.message).split()).rstrip(".")
            raise ValueError(
                f"cannot load model {source!r}: {message}; expected {EXPECTED_SOURCE}"
            ) from None
        return Path(local), uri
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"model source {source!r} is neither a model URI nor an existing path; expected "
            f"{EXPECTED_SOURCE}"
        )
    return path, str(path.resolve())


def _local_artifacts(uri: str, scratch: str | os.PathLike) -> str:
    """The folder holding a model's artifacts: in place where the artifact store is a local
    folder (nothing is copied, so a FIFO or a link to a device planted in the store is met by
    ``model_files.read_regular``, not by a copy that waits on it forever), else downloaded into
    ``scratch``. ``runs:/<id>/<name>`` means the model the run logged under that name."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.utils.file_utils import local_file_uri_to_path

    if uri.startswith("runs:/"):
        run_id, _, name = uri[len("runs:/") :].partition("/")
        run = MlflowClient().get_run(run_id)
        logged = (
            mlflow.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
                output_format="list",
            )
            if re.fullmatch(r"[\w.-]+", name)
            else []
        )
        if logged:
            uri = f"models:/{logged[0].model_id}"
    if uri.startswith("models:/"):
        underlying = ModelsArtifactRepository.get_underlying_uri(uri)
    else:
        underlying = RunsArtifactRepository.get_underlying_uri(uri)
    if re.match(r"^(file:|/)", underlying):
        local = Path(local_file_uri_to_path(underlying))
        if local.is_dir():
            return str(local)
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch))


def alias_version(source: str) -> str | None:
    """``name/version`` that a ``models:/name@alias`` or ``models:/name/version`` URI names."""
    if not source.startswith("models:/"):
        return None
    name, _, rest = source[len("models:/") :].partition("@")
    client = MlflowClient()
    try:
        if rest:
            return f"{name}/{client.get_model_version_by_alias(name, rest).version}"
        name, _, number = name.partition("/")
        return f"{name}/{number}" if number else None
    except MlflowException:
        return None


def source_run_id(source: str) -> str | None:
    """The run that logged the model a ``runs:/`` or ``models:/`` URI names (None for a folder,
    or a registry entry that no longer resolves)."""
    source = str(source)
    if source.startswith("runs:/"):
        return source[len("runs:/") :].strip("/").split("/")[0] or None
    named = alias_version(source)
    if not named:
        return None
    name, _, number = named.rpartition("/")
    try:
        return MlflowClient().get_model_version(name, number).run_id
    except MlflowException:
        return None
