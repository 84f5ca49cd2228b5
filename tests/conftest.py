"""Shared fixtures: a tiny synthetic dataset, a throwaway MLflow store, the real images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leukemia import sqlite_store, synthetic

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "all"

requires_real_data = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"real images not found at {REAL_DATA}"
)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """8 synthetic images per class, generated once per test session (read-only for tests)."""
    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "data", per_class=8, seed=3)


@pytest.fixture(scope="session")
def small_processed(synthetic_dir, tmp_path_factory) -> Path:
    """The synthetic dataset preprocessed at 64 x 64, for the training tests (read-only)."""
    from leukemia.preprocess import preprocess
    from leukemia.segmentation import SegmentationParams

    out = tmp_path_factory.mktemp("processed") / "small"
    return preprocess(
        synthetic_dir, out, seg=SegmentationParams(image_size=64), progress=False, workers=1
    ).out_dir


@pytest.fixture
def dataset_copy(synthetic_dir, tmp_path) -> Path:
    """A private, writable copy of the synthetic dataset, for tests that damage it."""
    import shutil

    target = tmp_path / "data"
    shutil.copytree(synthetic_dir, target)
    return target


def forget_experiment() -> None:
    """``mlflow.set_experiment`` caches the experiment id process-wide (a module variable and
    ``MLFLOW_EXPERIMENT_ID`` in ``os.environ``); a fresh store has no experiment of that id, so
    a test that switches stores forgets both."""
    from mlflow.tracking import fluent

    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store for this test, and a private cache for generated data."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LEUKEMIA_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    import mlflow

    # MLflow puts a SQLite store's artifacts under ./mlruns: keep them in the test's folder.
    monkeypatch.chdir(tmp_path)
    forget_experiment()
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    forget_experiment()
    mlflow.set_tracking_uri(None)


def pytest_configure(config):
    os.environ.setdefault("TQDM_DISABLE", "1")


def mlflow_run_env(tmp_path: Path) -> dict:
    """Environment for an ``mlflow run`` subprocess: a fresh store and cache in ``tmp_path``,
    this interpreter's bin folder first on PATH (entry points call ``leukemia`` by name)."""
    import sys

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "LEUKEMIA_CACHE_DIR": str(tmp_path / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    # Made whole here, first: a test that polls the store with plain MLflow while its
    # subprocess starts would otherwise create it at the same moment, in place, and the
    # subprocess would find a half-created store (seen under load in test_processes.py).
    sqlite_store.ensure(env["MLFLOW_TRACKING_URI"])
    return env


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(process, url: str, seconds: float, what: str) -> None:
    """Wait until ``url`` (a server's /health) answers; else kill ``process``'s group (started
    with ``start_new_session``) and fail the test naming ``what``."""
    import signal
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pytest.fail(f"{what} did not answer {url} within {seconds:.0f} s")
