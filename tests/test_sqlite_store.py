"""A local SQLite tracking store is created whole or not at all (issue 23, item 11): kill -9
during its creation, or two commands creating it at once, never leave a file every later command
fails on; a half-created store made elsewhere is one line naming it."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from leukemia import sqlite_store

from .conftest import REPO

ENSURE = "import sys; from leukemia import sqlite_store; sqlite_store.ensure(sys.argv[1])"


def _ensure_process(uri: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ENSURE, uri], cwd=REPO)


def _whole(path) -> bool:
    """MLflow opens it and finds its Default experiment."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{path}")
    return [e.name for e in client.search_experiments()] == ["Default"]


def test_kill_9_while_the_store_is_created_leaves_no_half_store(tmp_path):
    path = tmp_path / "mlflow.db"
    uri = f"sqlite:///{path}"
    for delay in (0.5,):  # inside the migrations (about 0.4 to 1.5 s after the file appears)
        process = _ensure_process(uri)
        # Killed once creation has begun: the temporary (or, before the fix, mlflow.db) exists.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if path.exists() or any(tmp_path.glob(f"{sqlite_store.TEMP_PREFIX}*")):
                break
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not path.exists() or _whole(path), f"killed {delay} s in: a half-created store"
        path.unlink(missing_ok=True)
    # Two creators at once make one whole store, and remove the killed processes' temporaries.
    creators = [_ensure_process(uri) for _ in range(2)]
    assert [p.wait(timeout=120) for p in creators] == [0, 0]
    assert _whole(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def _make_store(path):
    sqlite_store.ensure(f"sqlite:///{path}")
    assert _whole(path)


def test_a_half_created_store_is_named_and_left_alone(tmp_path):
    path = tmp_path / "mlflow.db"
    _make_store(path)
    sqlite_store.check(path)  # whole: nothing to say
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE _alembic_tmp_metrics (key TEXT)")
    before = path.read_bytes()
    with pytest.raises(sqlite_store.HalfCreated, match="_alembic_tmp_metrics left behind"):
        sqlite_store.ensure(f"sqlite:///{path}")
    assert path.read_bytes() == before

    # Killed between two migrations: an older schema and no Default experiment yet.
    other = tmp_path / "other.db"
    _make_store(other)
    with sqlite3.connect(other) as db:
        db.execute("DELETE FROM experiments")
        db.execute("UPDATE alembic_version SET version_num = 'bd07f7e963c5'")
    with pytest.raises(sqlite_store.HalfCreated, match="interrupted at schema bd07f7e963c5"):
        sqlite_store.check(other)

    # A whole store of an older MLflow is not half-created: MLflow asks to upgrade it.
    with sqlite3.connect(other) as db:
        db.execute(
            "INSERT INTO experiments (experiment_id, name, lifecycle_stage) "
            "VALUES (0, 'Default', 'active')"
        )
    sqlite_store.check(other)


def test_a_command_on_a_half_created_store_says_so_in_one_line(tmp_path, tracking_uri):
    from click.testing import CliRunner

    from leukemia.cli import main

    path = sqlite_store.local_path(tracking_uri)  # the fixture's, set as MLflow's URI too
    _make_store(path)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE _alembic_tmp_params (key TEXT)")
    for command in (["models"], ["promote"], ["report", "0" * 32]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert result.output.splitlines() == [
            f"Error: {path} is a half-created MLflow store (its creation was interrupted: "
            f"_alembic_tmp_params left behind); set it aside (mv {path} {path}.broken) and run "
            "the command again"
        ]


def test_other_uris_are_not_touched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("http://localhost:1", "postgresql://u@h/db", "sqlite://", "sqlite:///:memory:"):
        sqlite_store.ensure(uri)
    sqlite_store.ensure(f"sqlite:///{tmp_path}/missing-folder/mlflow.db")
    assert list(tmp_path.iterdir()) == []
