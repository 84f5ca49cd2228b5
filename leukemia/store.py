"""Immutable output folders addressed by their cache key, inside one folder this program owns.

Layout of an output root (``--out-dir``, e.g. ``processed``)::

    .leukemia-store.json     marks the root as ours (written first, never by anyone else)
    <key[:16]>/              one complete output per cache key, never changed once published
    latest -> <key[:16]>     a friendly pointer at the most recently used output
    .tmp-<32 hex>/           a build in progress; ``.build.json`` inside names its process

Writers build in a temporary folder and publish it with one ``rename``; a second writer of the
same key finds the first's folder complete and discards its own, so concurrent writers produce
one complete folder. The root itself is never renamed or replaced, so it may be a mount point
(a Docker volume).

Deletion is proven, never guessed: only a ``.tmp-`` folder whose exact name we generate, inside a
root carrying our marker, holding a ``.build.json`` we wrote, on this host, whose process (pid
and start time) is gone, is removed. Nothing is globbed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from .processes import process_start

ROOT_MARKER = ".leukemia-store.json"
BUILD_FILE = ".build.json"
LATEST = "latest"
_TEMPORARY = re.compile(r"^\.tmp-[0-9a-f]{32}$")
KEY_CHARS = 16


class StoreError(ValueError):
    """The output root cannot be used (not ours, not a folder, an older layout)."""


class OutputStore:
    """One output root: find, build and publish keyed outputs (see the module)."""

    def __init__(self, root: str | os.PathLike, owner: str):
        self.root = Path(root)
        self.owner = owner
        self.created_root = False

    # -- the root -----------------------------------------------------------------------------

    def open(self) -> OutputStore:
        """Check that the root is ours (or empty, or absent: then claim it)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise StoreError(f"--out-dir {str(root)!r} exists and is not a directory")
        if self._marked():
            return self
        entries = [p for p in root.iterdir() if p.name != ROOT_MARKER] if root.is_dir() else []
        if entries and all(self._older_store(p) for p in entries):
            pass  # only stores of ours inside (processed/segmented and processed/raw of old)
        elif entries:
            if (root / "params.json").is_file() and (root / "manifest.csv").is_file():
                raise StoreError(
                    f"--out-dir {str(root)!r} holds an output of an older leukemia preprocess "
                    "(one folder replaced on every option change); move or remove it, or "
                    "choose another --out-dir"
                )
            raise StoreError(
                f"--out-dir {str(root)!r} is not empty and was not written by {self.owner}; "
                "choose a new or empty directory"
            )
        self.created_root = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        claim = root / f".claim-{uuid.uuid4().hex}"
        claim.write_text(json.dumps({"written_by": self.owner}) + "\n")
        try:
            os.link(claim, root / ROOT_MARKER)  # atomic: exactly one claimant creates it
        except FileExistsError:
            pass
        finally:
            claim.unlink()
        if not self._marked():
            raise StoreError(f"--out-dir {str(root)!r} is marked by another program")
        return self

    def _older_store(self, path: Path) -> bool:
        """A folder that is itself a store of ours (the per-arm stores earlier versions made
        under ``processed``): a root holding only such folders can be claimed."""
        return path.is_dir() and not path.is_symlink() and OutputStore(path, self.owner)._marked()

    def _marked(self) -> bool:
        try:
            mark = json.loads((self.root / ROOT_MARKER).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(mark, dict) and mark.get("written_by") == self.owner

    def release_if_unused(self) -> None:
        """Undo ``open`` when it created the root and nothing was published or is building."""
        if not self.created_root:
            return
        if any(p.name != ROOT_MARKER for p in self.root.iterdir()):
            return
        (self.root / ROOT_MARKER).unlink(missing_ok=True)
        try:
            self.root.rmdir()
        except OSError:  # someone else started writing meanwhile: theirs now
            pass

    # -- outputs ------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return self.root / key[:KEY_CHARS]

    def find(self, key: str, read_key) -> Path | None:
        """The complete output of ``key``, or None. ``read_key(folder)`` returns the key a
        complete folder records (None when incomplete or not ours)."""
        folder = self.path(key)
        if not folder.is_dir() or folder.is_symlink():
            return None
        recorded = read_key(folder)
        if recorded == key:
            return folder
        raise StoreError(
            f"{str(folder)!r} exists but is not the complete output of this cache key "
            f"({'another key' if recorded else 'incomplete or foreign'}); move or remove it"
        )

    def new_temporary(self) -> Path:
        """A fresh build folder whose ``.build.json`` proves it is ours (see the module)."""
        folder = self.root / f".tmp-{uuid.uuid4().hex}"
        folder.mkdir()
        build = {
            "written_by": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": process_start(os.getpid()),
        }
        (folder / BUILD_FILE).write_text(json.dumps(build) + "\n")
        return folder

    def publish(self, temporary: Path, key: str, read_key) -> tuple[Path, bool]:
        """Rename the finished ``temporary`` to the key's folder. Returns the folder and whether
        this call published it (False: a concurrent writer of the same key was first, and
        ``temporary`` is removed)."""
        target = self.path(key)
        try:
            os.rename(temporary, target)
            return target, True
        except OSError:
            if self.find(key, read_key) is None:
                raise
        shutil.rmtree(temporary)
        return target, False

    def point_latest(self, folder: Path) -> None:
        """Make ``latest`` a relative symlink to ``folder`` (atomically; best effort: reading a
        store never needs a write, so a read-only mount or a file system without symlinks
        leaves ``latest`` as it is and the keyed folder still works)."""
        link = self.root / LATEST
        if link.exists() and not link.is_symlink():
            return  # not ours to replace
        if link.is_symlink() and os.readlink(link) == folder.name:
            return  # already there: nothing to write
        staged = self.root / f".latest-{uuid.uuid4().hex}"
        try:
            os.symlink(folder.name, staged)
            os.replace(staged, link)
        except OSError:
            with contextlib.suppress(OSError):  # on a read-only mount even this is EROFS
                staged.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove build folders of processes that are gone (proven ours; see the module)."""
        removed = []
        host = socket.gethostname()
        for entry in self.root.iterdir():
            if not _TEMPORARY.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
                continue
            try:
                build = json.loads((entry / BUILD_FILE).read_text())
                owned = build["written_by"] == self.owner and build["host"] == host
                alive = process_start(int(build["pid"])) == build["process_start"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # no proof that it is ours: leave it
            if owned and not alive:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed
