"""``leukemia serve`` serves only a model in leukemia's own format: a tampered folder that would
make MLflow run code (another loader module with a code folder, the pickle flavor, a python
model) or hang on a file (a FIFO, a link to a device) is refused in one line, as a real
``leukemia serve`` process, before MLflow reads it; nothing planted runs."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leukemia import model_files, serving

from .test_model_files import _code, _Payload, logged  # noqa: F401 - the logged-model fixture

BIN = Path(sys.executable).parent


def _model_copy(original: Path, folder: Path) -> Path:
    """The logged model's own files (the fixture downloaded it beside its store)."""
    for relative in serving.SERVED_FILES:
        if (original / relative).is_file():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(original / relative, folder / relative)
    return folder


def _serve(folder: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """A real ``leukemia serve`` on ``folder``; one that serves instead of refusing is killed
    at ``timeout`` and fails the test."""
    return subprocess.run(
        [BIN / "leukemia", "serve", "-m", str(folder), "-p", "1"],
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _edit_mlmodel(folder: Path, change) -> None:
    path = folder / "MLmodel"
    described = yaml.safe_load(path.read_text())
    change(described)
    path.write_text(yaml.safe_dump(described))


def _code_folder(folder: Path, marker: Path) -> None:
    (folder / "code").mkdir()
    (folder / "code" / "planted.py").write_text(
        f"{_code(marker)}\ndef _load_pyfunc(path):\n    raise SystemExit(0)\n"
    )

    def change(described):
        flavor = described["flavors"]["python_function"]
        flavor["loader_module"], flavor["code"] = "planted", "code"

    _edit_mlmodel(folder, change)


def _pickle_flavor(folder: Path, marker: Path) -> None:
    (folder / "data" / "model.pth").write_bytes(pickle.dumps(_Payload(_code(marker))))

    def change(described):
        described["flavors"] = {
            "python_function": {"loader_module": "mlflow.pytorch", "data": "data"},
            "pytorch": {"model_data": "data", "pytorch_version": "2.0.0"},
        }

    _edit_mlmodel(folder, change)


def _python_model(folder: Path, marker: Path) -> None:
    (folder / "python_model.pkl").write_bytes(pickle.dumps(_Payload(_code(marker))))
    (folder / "served_model.py").write_text(_code(marker) + "\n")

    def change(described):
        described["flavors"]["python_function"] = {
            "loader_module": "mlflow.pyfunc.model",
            "python_model": "python_model.pkl",
            "code": None,
        }

    _edit_mlmodel(folder, change)


def _loader_only(folder: Path, marker: Path) -> None:
    """The loader moved to a module of the installed environment, no file added."""

    def change(described):
        described["flavors"]["python_function"]["loader_module"] = "mlflow.pytorch"

    _edit_mlmodel(folder, change)


@pytest.mark.parametrize(
    "tamper, says",
    [
        (_code_folder, "folder 'code'"),
        (_pickle_flavor, "model.pth"),
        (_python_model, "python_model.pkl"),
        (_loader_only, "loader_module"),
    ],
    ids=["code-folder", "pickle-flavor", "python-model", "other-loader"],
)
def test_serve_refuses_a_folder_that_would_run_code(logged, tmp_path, tamper, says):  # noqa: F811
    _, original = logged
    marker, folder = tmp_path / "marker", tmp_path / "model"
    _model_copy(original, folder)
    tamper(folder, marker)
    done = _serve(folder)
    assert done.returncode != 0
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1 and "cannot serve model" in error_lines[0], done.stderr
    assert says in error_lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_serve_refuses_a_fifo_and_a_link_to_a_device_without_waiting(logged, tmp_path):  # noqa: F811
    _, original = logged
    fifo, zero = tmp_path / "fifo", tmp_path / "zero"
    _model_copy(original, fifo)
    spec = fifo / "data" / "model" / model_files.SPEC_FILE
    spec.unlink()
    os.mkfifo(spec)
    done = _serve(fifo, timeout=60)
    assert done.returncode != 0 and "model.json" in done.stderr
    assert "not a regular file" in done.stderr, done.stderr

    _model_copy(original, zero)
    weights = zero / "data" / "model" / model_files.WEIGHTS_FILE
    weights.unlink()
    weights.symlink_to("/dev/zero")
    done = _serve(zero, timeout=60)
    assert done.returncode != 0 and "not a regular file" in done.stderr, done.stderr


def test_checked_copy_reads_at_most_the_limit(tmp_path):
    source = tmp_path / "source"
    (source / "data").mkdir(parents=True)
    (source / "MLmodel").write_bytes(b"x" * 11)
    (source / "data" / "a").write_bytes(b"y" * 3)
    with pytest.raises(model_files.ModelFileError, match="larger than 10 bytes"):
        model_files.copy_checked(source, tmp_path / "one", {"MLmodel": 10, "data/a": 3})
    copy = model_files.copy_checked(source, tmp_path / "two", {"MLmodel": 11, "data/a": 3})
    assert (copy / "data" / "a").read_bytes() == b"yyy"
    (source / "data" / "b").write_bytes(b"")
    with pytest.raises(model_files.ModelFileError, match=r"\['data/b'\]"):
        model_files.copy_checked(source, tmp_path / "three", {"MLmodel": 11, "data/a": 3})


def test_the_untampered_folder_passes_the_check(logged, tmp_path):  # noqa: F811
    _, original = logged
    with serving.served_copy(str(_model_copy(original, tmp_path / "model"))) as copy:
        assert (copy / "data" / "model" / model_files.WEIGHTS_FILE).is_file()
        assert sorted(p.name for p in copy.iterdir()) <= sorted(serving.SERVED_FILES)
    assert not copy.exists()
