"""An Optuna journal survives a crash mid-write: a torn last record is set aside (the file
backed up first) before a worker appends to it, and a damaged journal is one line naming the
file and the line. A study name is a name: it cannot write outside searches/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from leukemia import search as search_lib

BIN = Path(sys.executable).parent


def _study(path: Path, trials: int) -> optuna.Study:
    storage = search_lib.open_storage(str(path), warn=lambda line: None)
    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=trials)
    return study


def test_a_torn_last_record_is_set_aside_and_the_next_worker_appends_cleanly(tmp_path):
    path = tmp_path / "optuna.journal"
    _study(path, 2)
    whole = path.read_bytes()
    # What a crash mid-append leaves: the first 40 bytes of a record, no newline.
    torn = whole + b'{"op_code":4,"worker_id":"dead","study_id":0,"dat'
    path.write_bytes(torn)
    said = []
    storage = search_lib.open_storage(str(path), warn=said.append)
    assert len(said) == 1 and "last record was cut off" in said[0] and "\n" not in said[0]
    backups = list(tmp_path.glob("optuna.journal.torn-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == torn  # nothing lost
    assert path.read_bytes() == whole
    study = optuna.load_study(study_name="s", storage=storage)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    # A fresh reader sees every trial: the append did not land on the torn line.
    again = optuna.load_study(study_name="s", storage=search_lib.open_storage(str(path)))
    assert [t.state for t in again.trials] == [optuna.trial.TrialState.COMPLETE] * 3


def test_a_worker_that_crashes_mid_append_while_another_runs_loses_nothing(tmp_path):
    """Worker A has the journal open; worker B dies mid-append (a torn record, its lock gone);
    A's next append sets the torn record aside first instead of landing on it."""
    path = tmp_path / "optuna.journal"
    said = []
    storage = search_lib.open_storage(str(path), warn=said.append)
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    with open(path, "ab") as handle:  # worker B, killed after writing part of a record
        handle.write(b'{"op_code":5,"worker_id":"b","trial_id":9,"para')
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(said) == 1 and "last record was cut off" in said[0]
    assert len(list(tmp_path.glob("optuna.journal.torn-*"))) == 1
    again = optuna.load_study(study_name="s", storage=search_lib.open_storage(str(path)))
    assert [t.state for t in again.trials] == [optuna.trial.TrialState.COMPLETE] * 3


def test_a_sound_journal_is_left_as_it_is(tmp_path):
    path = tmp_path / "optuna.journal"
    _study(path, 1)
    before = path.read_bytes()
    said = []
    search_lib.open_storage(str(path), warn=said.append)
    assert path.read_bytes() == before and said == [] and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    "damage, line",
    [
        (lambda whole: whole + b"garbage\n", 8),
        (lambda whole: whole.replace(b"\n", b"\n{oops\n", 1), 2),
        (lambda whole: b"\x89\xff\x00random bytes", 1),
        (lambda whole: whole[:-1] + b'{"op_code":4}\n', 7),  # a record glued onto a torn one
    ],
    ids=["garbage-line", "garbage-in-the-middle", "random-bytes", "glued"],
)
def test_a_damaged_journal_is_one_line_naming_file_and_line(tmp_path, damage, line):
    path = tmp_path / "optuna.journal"
    _study(path, 2)
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match=rf"optuna.journal' line {line} is not a journal record"):
        search_lib.open_storage(str(path))
    assert path.read_bytes() == damaged  # refused, not changed


def test_the_command_line_says_it_in_one_line(tmp_path):
    journal = tmp_path / "bad.journal"
    journal.write_bytes(b"\x00\x01 not a journal\n")
    done = subprocess.run(
        [BIN / "leukemia", "search", "--report", "--storage", str(journal), "--study-name", "s"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "bad.journal' line 1 is not a journal record" in done.stderr


@pytest.mark.parametrize(
    "name", ["../x", "/tmp/abs", "a/b", "..", ".hidden", "", "a\\b", "x" * 200, "-x", "a\nb"]
)
def test_a_study_name_is_a_name(name):
    with pytest.raises(ValueError, match="is not a name"):
        search_lib.check_study_name(name)


def test_the_command_line_refuses_a_study_name_that_leaves_searches(tmp_path):
    done = subprocess.run(
        [BIN / "leukemia", "search", "--study-name", "../x", "--storage", "j.journal"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode != 0 and "study name '../x' is not a name" in done.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "j.journal").exists()
