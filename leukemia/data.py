"""The dataset: class folders, canonical labels and the manifest (the split itself: ``split``).

Both public releases of the ALL dataset are accepted. The 3,256-image release names its class
folders ``Benign``, ``Early``, ``Pre``, ``Pro`` (under ``Original/``); the 3,242-image release
names them ``Benign``, ``[Malignant] early Pre-B``, ``[Malignant] Pre-B``, ``[Malignant] Pro-B``
(under ``Blood cell Cancer [ALL]/``). Both map onto one label order, ``CLASSES``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_SUFFIXES

CLASSES = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = (
    "path",
    "class",
    "label",
    "split",
    "group",
    "sha256",
    "width",
    "height",
    "dhash",
    "processed",
)
# Folder names after lower-casing and dropping "[malignant]", spaces, hyphens and underscores.
_FOLDER_ALIASES = {
    "benign": "Benign",
    "early": "Early Pre-B",
    "earlypreb": "Early Pre-B",
    "pre": "Pre-B",
    "preb": "Pre-B",
    "pro": "Pro-B",
    "prob": "Pro-B",
}
# When DIR holds several dataset copies (the 3,256 release ships Original/ and Segmented/),
# the raw images are the ones to use.
_PREFERRED_PARENTS = ("original",)


def slug(name: str) -> str:
    """A name as a key part: 'Early Pre-B' -> 'early_pre_b' (metric, param and column names)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def prob_column(class_name: str) -> str:
    """The probability column of a class, one naming everywhere: the served model's output,
    ``predictions.csv`` and ``predict --json`` ('Early Pre-B' -> 'prob_early_pre_b')."""
    return f"prob_{slug(class_name)}"


class DatasetError(ValueError):
    """The data directory or manifest is not what the pipeline expects."""


def canonical_class(folder_name: str) -> str | None:
    """Map a class folder name from either release to a ``CLASSES`` entry, or None."""
    key = re.sub(r"\[malignant\]|[\s\-_]", "", folder_name.lower())
    return _FOLDER_ALIASES.get(key)


@dataclass(frozen=True)
class ImageFile:
    path: str  # relative to the dataset root, with forward slashes
    class_name: str
    size: int
    mtime_ns: int

    @property
    def label(self) -> int:
        return CLASSES.index(self.class_name)


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _holds(directory: Path) -> str:
    """'is empty', or what a folder without subfolders holds instead ('holds 3 files, no
    folders (e.g. 'a.jpg')'): a folder of images without class folders is not empty."""
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith("."))
    if not names:
        return "is empty"
    return f"holds {len(names)} file(s) and no folders (e.g. {names[0]!r})"


def resolve_root(data_dir: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """Find the folder that holds the class folders: DIR itself or one level below it.

    Returns the root and ``{folder name: class}``. Raises DatasetError naming what was found.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"data directory {str(data_dir)!r} does not exist or is not a directory")
    subdirs = _subdirs(data_dir)
    if not subdirs:
        raise DatasetError(
            f"data directory {str(data_dir)!r} {_holds(data_dir)}; expected class folders "
            f"{_expected_folders()} or a folder holding them (e.g. Original/)"
        )
    if any(canonical_class(d.name) for d in subdirs):
        return data_dir, _class_folders(data_dir, subdirs)
    candidates = [d for d in subdirs if any(canonical_class(s.name) for s in _subdirs(d))]
    if len(candidates) > 1:
        preferred = [d for d in candidates if d.name.lower() in _PREFERRED_PARENTS]
        if len(preferred) != 1:
            names = ", ".join(repr(d.name) for d in candidates)
            raise DatasetError(
                f"{str(data_dir)!r} holds several datasets ({names}); pass one of them as data dir"
            )
        candidates = preferred
    if not candidates:
        names = ", ".join(repr(d.name) for d in subdirs)
        raise DatasetError(
            f"no class folders in {str(data_dir)!r} (found {names}); expected "
            f"{_expected_folders()} in it or in one folder below it"
        )
    root = candidates[0]
    return root, _class_folders(root, _subdirs(root))


def _expected_folders() -> str:
    return (
        "Benign, Early, Pre, Pro (3,256-image release) or Benign, [Malignant] early Pre-B, "
        "[Malignant] Pre-B, [Malignant] Pro-B (3,242-image release)"
    )


def _class_folders(root: Path, subdirs: list[Path]) -> dict[str, str]:
    mapping = {d.name: canonical_class(d.name) for d in subdirs}
    unknown = sorted(name for name, cls in mapping.items() if cls is None)
    if unknown:
        raise DatasetError(
            f"unknown class folder(s) {unknown} in {str(root)!r}; found {sorted(mapping)}, "
            f"expected {_expected_folders()}"
        )
    by_class: dict[str, list[str]] = {}
    for name, cls in mapping.items():
        by_class.setdefault(cls, []).append(name)
    clashes = {cls: names for cls, names in by_class.items() if len(names) > 1}
    if clashes:
        raise DatasetError(f"several folders map to one class in {str(root)!r}: {clashes}")
    missing = [cls for cls in CLASSES if cls not in by_class]
    if missing:
        raise DatasetError(
            f"class folder(s) for {missing} missing in {str(root)!r}; found {sorted(mapping)}, "
            f"expected {_expected_folders()}"
        )
    return mapping


def list_images(root: Path, folders: dict[str, str]) -> tuple[list[ImageFile], list[str]]:
    """All files with an image suffix under the class folders, sorted by path.

    Returns the images and the other files found there (listed in the audit, never read).
    """
    images, ignored = [], []
    for folder, class_name in sorted(folders.items()):
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                if name.startswith("."):
                    continue
                if full.suffix.lower() not in IMAGE_SUFFIXES:
                    ignored.append(rel)
                    continue
                try:
                    stat = full.stat()
                except OSError:  # a broken or looping symlink: listed as unreadable later
                    stat = full.lstat()
                images.append(ImageFile(rel, class_name, stat.st_size, stat.st_mtime_ns))
    images.sort(key=lambda f: f.path)
    if not images:
        raise DatasetError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {str(root)!r}"
        )
    return images, ignored


# ---------------------------------------------------------------------------------------------
# Manifest


def manifest_bytes(rows: list[dict]) -> bytes:
    """CSV bytes of the manifest, rows sorted by path: byte-identical for identical input."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["path"]):
        writer.writerow({key: row[key] for key in MANIFEST_COLUMNS})
    return buffer.getvalue().encode("utf-8")


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Read and check a manifest written by ``leukemia preprocess``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {str(path)!r} does not exist")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            required = {"path", "class", "split", "sha256"}
            missing = required - set(reader.fieldnames or ())
            if missing:
                raise DatasetError(
                    f"manifest {str(path)!r} lacks column(s) {sorted(missing)}; "
                    f"expected a manifest.csv written by leukemia preprocess"
                )
            rows = list(reader)
            if any("\x00" in str(value) for row in rows for value in row.values()):
                raise csv.Error("NUL byte")  # Python 3.11's csv reads them; no path holds one
    except (UnicodeDecodeError, csv.Error) as error:  # a binary file, NUL bytes
        raise DatasetError(
            f"manifest {str(path)!r} is not a UTF-8 CSV ({error}); "
            f"expected a manifest.csv written by leukemia preprocess"
        ) from None
    bad_class = sorted({r["class"] for r in rows} - set(CLASSES))
    bad_split = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad_class or bad_split:
        raise DatasetError(
            f"manifest {str(path)!r} has unknown class {bad_class} or split {bad_split} values; "
            f"expected classes {list(CLASSES)} and splits {list(SPLITS)}"
        )
    if not rows:
        raise DatasetError(f"manifest {str(path)!r} lists no images")
    return rows


def split_fingerprint(rows: list[dict]) -> str:
    """SHA-256 of what defines an experiment's data: each image's path, content hash, class and
    split. Equal for the segmented and raw outputs of one split, so two arms (or two registered
    models) can be checked to have been tested on the same images."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r["path"]):
        digest.update(f"{row['path']}\t{row['sha256']}\t{row['class']}\t{row['split']}\n".encode())
    return digest.hexdigest()


def class_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """``{split: {class: images}}`` with every split and class present (zeros included)."""
    counts = {split: dict.fromkeys(CLASSES, 0) for split in SPLITS}
    for row in rows:
        counts[row["split"]][row["class"]] += 1
    return counts
