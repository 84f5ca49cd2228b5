"""The split: which images must stay together (exact and near-duplicates, blocks of
consecutive file numbers) and a stratified split of those groups into train, val and test.
Pure functions on lists and arrays; ``SplitParams`` holds the options (the paper's 70/15/15)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import SPLITS

# How images are grouped: one by one (duplicates still together), or in blocks of consecutive
# file numbers (pseudo-patients: neighbouring numbers often show the same slide).
GROUP_BY = ("image", "index-block")


@dataclass(frozen=True)
class SplitParams:
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 42
    group_by: str = "image"
    block_size: int = 24
    near_duplicate_distance: int = 4

    def __post_init__(self):
        object.__setattr__(self, "fractions", parse_fractions(self.fractions))
        if self.group_by not in GROUP_BY:
            raise ValueError(
                f"unsupported group_by, got {self.group_by!r}; expected image or index-block"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 <= self.near_duplicate_distance <= 64:
            raise ValueError(
                "near_duplicate_distance must be 0..64 bits of the 64-bit dHash, "
                f"got {self.near_duplicate_distance}"
            )


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
    group_by: str,
    block_size: int = SplitParams.block_size,
) -> list[int]:
    """Group index per image: linked duplicates share one, and with ``group_by="index-block"``
    so do runs of ``block_size`` consecutive file numbers in one folder (pseudo-patients).

    Groups are numbered 0, 1, ... in the order of their first member in ``paths``.
    """
    if group_by not in GROUP_BY:
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


def stratified_group_split(labels: list[int], groups: list[int], fractions, seed: int) -> list[str]:
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
