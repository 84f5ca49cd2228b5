"""The dataset: class folders, canonical labels, duplicate groups, the split and its manifest.

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

import numpy as np

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
            f"data directory {str(data_dir)!r} is empty; expected class folders "
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
# Duplicate groups


def _popcount64(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(len(values), 8)
    return np.unpackbits(as_bytes, axis=1).sum(axis=1)


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def groups(self) -> list[int]:
        return [self.find(i) for i in range(len(self.parent))]


def duplicate_pairs(sha256s: list[str], dhashes: list[int], max_distance: int):
    """Exact pairs (same content hash) and near pairs (dHash Hamming distance <= max_distance).

    Returns two lists of (i, j, distance) with i < j, each image paired with every match.
    """
    exact, near = [], []
    by_hash: dict[str, list[int]] = {}
    for i, digest in enumerate(sha256s):
        by_hash.setdefault(digest, []).append(i)
    for members in by_hash.values():
        exact += [(members[0], j, 0) for j in members[1:]]
    if max_distance < 0 or len(dhashes) < 2:
        return exact, near
    hashes = np.array([h & 0xFFFFFFFFFFFFFFFF for h in dhashes], dtype=np.uint64)
    for i in range(len(hashes) - 1):
        distances = _popcount64(hashes[i + 1 :] ^ hashes[i])
        for offset in np.flatnonzero(distances <= max_distance):
            j = i + 1 + int(offset)
            if sha256s[i] != sha256s[j]:
                near.append((i, j, int(distances[offset])))
    return exact, near


def file_number(path: str) -> int | None:
    """The running number in a file name (``WBC-Malignant-Pre-017.jpg`` -> 17), or None."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else None


def assign_groups(
    paths: list[str],
    pairs: list[tuple[int, int, int]],
    group_by: str = "image",
    block_size: int = 24,
) -> list[int]:
    """Group index per image: linked duplicates share one, and with ``group_by="index-block"``
    so do runs of ``block_size`` consecutive file numbers in one folder (pseudo-patients).

    Groups are numbered 0, 1, ... in the order of their first member in ``paths``.
    """
    if group_by not in ("image", "index-block"):
        raise ValueError(f"unsupported group_by, got {group_by!r}; expected image or index-block")
    if group_by == "index-block" and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    union = UnionFind(len(paths))
    for i, j, _ in pairs:
        union.union(i, j)
    if group_by == "index-block":
        first_in_block: dict[tuple[str, int], int] = {}
        for i, path in enumerate(paths):
            number = file_number(path)
            if number is None:
                continue
            key = (str(Path(path).parent), (number - 1) // block_size)
            union.union(first_in_block.setdefault(key, i), i)
    roots = union.groups()
    numbering: dict[int, int] = {}
    return [numbering.setdefault(root, len(numbering)) for root in roots]


# ---------------------------------------------------------------------------------------------
# Split


def parse_fractions(text: str | tuple) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> (0.7, 0.15, 0.15); they must be >= 0 and sum to 1."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"split fractions must be three numbers train,val,test, got {text!r}"
        ) from None
    if len(values) != 3 or any(not np.isfinite(v) or v < 0 for v in values):
        raise ValueError(
            f"split fractions must be three numbers >= 0 (train,val,test), got {text!r}"
        )
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {text!r} (sum {sum(values):g})")
    if min(values) == 0:
        raise ValueError(f"the train, val and test fractions must be > 0, got {text!r}")
    return values


def stratified_group_split(
    labels: list[int], groups: list[int], fractions=(0.7, 0.15, 0.15), seed: int = 42
) -> list[str]:
    """A split name per image; every group lands whole in one split, per class in proportion.

    Within each class (a group counts for the class most of its images have), groups are taken
    largest first, ties in seeded random order, each into the split furthest below its target.
    With singleton groups this gives exactly round-to-nearest counts per class.
    """
    fractions = np.asarray(parse_fractions(tuple(fractions)))
    members: dict[int, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    group_class = {
        g: int(np.bincount([labels[i] for i in idx]).argmax()) for g, idx in members.items()
    }
    rng = np.random.default_rng(seed)
    split_of_group: dict[int, int] = {}
    for class_label in sorted(set(group_class.values())):
        class_groups = sorted(g for g, c in group_class.items() if c == class_label)
        tie_break = rng.permutation(len(class_groups))
        order = sorted(
            range(len(class_groups)), key=lambda k: (-len(members[class_groups[k]]), tie_break[k])
        )
        targets = fractions * sum(len(members[g]) for g in class_groups)
        counts = np.zeros(3)
        for k in order:
            group = class_groups[k]
            split = int(np.argmax(targets - counts))
            split_of_group[group] = split
            counts[split] += len(members[group])
    return [SPLITS[split_of_group[g]] for g in groups]


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
