"""A local SQLite tracking store is created whole or not at all.

MLflow creates ``mlflow.db`` in place: tables first, then some fifty schema migrations. A
process killed in between (Ctrl-C twice, kill -9, a full disk) leaves a file every later
command fails on (``table _alembic_tmp_metrics already exists``, ``duplicate column name``)
until someone deletes it. Here the store is built in a temporary file beside it and linked into
place only once complete; of two commands creating it at once, the first link wins and the
other discards its copy. A half-created store made by something else (``mlflow ui``, an older
version of this program) is one line saying what it is and how to set it aside.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from urllib.parse import unquote

from . import processes

TEMP_PREFIX = ".creating-"
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")  # what SQLite keeps beside a database


class HalfCreated(RuntimeError):
    """The SQLite tracking store exists but its creation never finished."""


def local_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` tracking URI (None for anything else, in-memory included)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    return Path(path).absolute() if path and path != ":memory:" else None


def ensure(uri: str) -> None:
    """Make sure the SQLite store of ``uri`` exists and is whole (nothing for other URIs)."""
    path = local_path(uri)
    if path is None:
        return
    if path.exists():
        check(path)
        return
    if not path.parent.is_dir():
        return  # MLflow's own error names the missing folder
    _remove_abandoned(path)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{processes.token().replace(':', '-')}")
    try:
        _create(temp)
        try:
            os.link(temp, path)  # never replaces: a store someone else finished first wins
        except FileExistsError:
            pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _create(temp: Path) -> None:
    """A complete, migrated store at ``temp``, made by MLflow's own code with the default
    artifact root MLflow would give it (so the Default experiment is the same)."""
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    with contextlib.suppress(FileNotFoundError):
        temp.unlink()  # our own token: a leftover of this very process
    store = _get_sqlalchemy_store(f"sqlite:///{temp}", None)
    store.engine.dispose()


def _remove_abandoned(path: Path) -> None:
    """Delete temporaries of ``path`` (and SQLite's journals of them) that this module made in a
    process now gone (the token in the name proves both), and nothing else."""
    prefix = f"{TEMP_PREFIX}{path.name}."
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        owner = entry.name[len(prefix) :]
        for suffix in SQLITE_SIDE_FILES:
            owner = owner.removesuffix(suffix)
        parts = owner.rsplit("-", 2)
        if len(parts) == 3 and processes.is_gone(":".join(parts)):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def check(path: Path) -> None:
    """Raise ``HalfCreated`` when ``path`` holds MLflow's tables but its creation never finished:
    a migration's temporary table left behind, or no experiment (MLflow adds the Default one
    once every migration ran) at a schema version short of MLflow's latest."""
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
            if "experiments" not in tables:
                return  # empty, or not MLflow's: MLflow creates or refuses it
            experiments = connection.execute("SELECT COUNT(*) FROM experiments").fetchone()[0]
            version = None
            if "alembic_version" in tables:
                row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
                version = row[0] if row else None
        finally:
            connection.close()
    except sqlite3.Error:
        return  # not ours to judge: MLflow's own error says what is wrong
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp"))
    if not leftovers and (experiments or version == _latest_revision()):
        return
    raise HalfCreated(
        f"{path} is a half-created MLflow store (its creation was interrupted"
        + (f": {leftovers[0]} left behind" if leftovers else f" at schema {version}")
        + f"); set it aside (mv {path} {path}.broken) and run the command again"
    )


def _latest_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()
