"""An Optuna journal file checked before a worker opens it.

Optuna's ``JournalFileBackend`` appends one JSON record per line, under a lock file. A crash
mid-append (disk full, power cut) leaves a last line without its newline; the next append lands
on the same line and from then on no study in the file loads (``Expecting ',' delimiter``).
``open_journal`` takes the same lock, so no append is in progress, and then (and again, for
the torn record, before each of its own appends: another worker may crash while this one
runs):

- a torn last record (bytes after the last newline) is set aside: the file is first copied
  whole to ``<file>.torn-<UTC time>``, then cut back to its last complete record;
- a complete line that is not a JSON object is a ``ValueError`` naming the file and the line:
  that is damage no cut can undo, so nothing is changed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path


def _line_error(line: bytes) -> str | None:
    """Why ``line`` is not a journal record (None when it is one)."""
    try:
        record = json.loads(line)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        return str(error).split(":")[0]
    if not isinstance(record, dict) or "op_code" not in record:
        return "a JSON value without an op_code"
    return None


def check(path: str | os.PathLike, echo: Callable[[str], None] = print) -> None:
    """Set aside a torn last record of the journal at ``path`` and refuse a damaged one (see
    the module). The caller holds the journal's lock."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # bytes up to the last newline
    for number, line in enumerate(data[:complete].splitlines(), start=1):
        reason = _line_error(line) if line.strip() else "an empty line"
        if reason:
            raise ValueError(
                f"Optuna journal {str(path)!r} line {number} is not a journal record ({reason}); "
                "expected one JSON record per line: restore the file from a backup or move it "
                "aside to start a new one"
            )
    if complete == len(data):
        return
    if not data[complete:].startswith(b'{"op_code":'[: len(data) - complete]):
        # Optuna writes each record as {"op_code":...}: anything else was never one.
        number = data[:complete].count(b"\n") + 1
        raise ValueError(
            f"Optuna journal {str(path)!r} line {number} is not a "
            "journal record; expected one JSON record per line: restore the file from a backup "
            "or move it aside to start a new one"
        )
    _set_aside(path, len(data) - complete, echo)


def _set_aside(path: Path, torn: int, echo: Callable[[str], None]) -> None:
    """Copy the journal whole to ``<file>.torn-<UTC time>-<pid>``, then cut its last ``torn``
    bytes (a record a crash cut off). The caller holds the journal's lock."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = path.with_name(f"{path.name}.torn-{stamp}-{os.getpid()}")
    partial = path.with_name(f".{backup.name}.partial")
    try:
        shutil.copyfile(path, partial)
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, backup)  # the whole file is safe before it is cut
    finally:
        partial.unlink(missing_ok=True)  # ours, and only there if the copy failed
    size = path.stat().st_size
    with open(path, "rb+") as handle:
        handle.truncate(size - torn)
        os.fsync(handle.fileno())
    echo(
        f"Optuna journal {path}: its last record was cut off by a crash ({torn} bytes); set "
        f"aside (the file as it was: {backup})"
    )


def _torn_tail(path: Path) -> int:
    """How many bytes follow the journal's last newline (0 for a sound or empty file)."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        back = min(size, 1 << 20)
        handle.seek(size - back)
        tail = handle.read(back)
    newline = tail.rfind(b"\n")
    return len(tail) - newline - 1 if newline >= 0 else (size if back == size else 0)


def open_journal(path: str | os.PathLike, echo: Callable[[str], None] = print):
    """An Optuna ``JournalStorage`` on the file at ``path`` (created with its folder if
    absent), checked first (``check``) under the journal's own lock. Each later append checks
    again, under the same lock, that the file still ends with a complete record: a worker that
    crashed mid-append while this one ran has its torn record set aside, not appended to. A
    journal whose records Optuna cannot replay is a ``ValueError`` naming the file."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    class CheckedBackend(JournalFileBackend):
        def append_logs(self, logs: list[dict]) -> None:
            # Optuna's append, with the tail check under the lock it holds for the write.
            self._lock.acquire()
            try:
                torn = _torn_tail(path)
                if torn:
                    _set_aside(path, torn, echo)
                text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
                with open(path, "ab") as handle:
                    handle.write(text.encode("utf-8"))
                    handle.flush()
                    os.fsync(handle.fileno())
            finally:
                self._lock.release()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileSymlinkLock(str(path))  # the lock JournalFileBackend takes by default
    lock.acquire()
    try:
        check(path, echo)
    finally:
        lock.release()
    try:
        return JournalStorage(CheckedBackend(str(path), lock_obj=lock))
    except (AssertionError, KeyError, ValueError, TypeError) as error:
        # Records that parse but do not replay ("Should not reach."): edited or mixed files.
        raise ValueError(
            f"Optuna journal {str(path)!r} holds records Optuna cannot replay "
            f"({type(error).__name__}: {str(error)[:120]}); restore it from a backup or move "
            "it aside to start a new one"
        ) from None
