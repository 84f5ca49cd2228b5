"""Class folders of both releases, duplicate grouping, the grouped stratified split, manifests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from leukemia import data, split

RELEASE_3256 = ("Benign", "Early", "Pre", "Pro")
RELEASE_3242 = ("Benign", "[Malignant] early Pre-B", "[Malignant] Pre-B", "[Malignant] Pro-B")


def make_tree(root: Path, folders, files_per_folder: int = 2) -> Path:
    for folder in folders:
        (root / folder).mkdir(parents=True)
        for i in range(files_per_folder):
            (root / folder / f"img-{i + 1:03d}.jpg").write_bytes(b"x")
    return root


@pytest.mark.parametrize("folders", [RELEASE_3256, RELEASE_3242])
def test_both_releases_map_to_one_label_order(tmp_path, folders):
    root, mapping = data.resolve_root(make_tree(tmp_path / "d", folders))
    assert root == tmp_path / "d"
    assert sorted(mapping.values()) == sorted(data.CLASSES)
    assert [data.canonical_class(f) for f in folders] == list(data.CLASSES)


@pytest.mark.parametrize(
    "parent, folders", [("Original", RELEASE_3256), ("Blood cell Cancer [ALL]", RELEASE_3242)]
)
def test_one_level_above_the_class_folders(tmp_path, parent, folders):
    make_tree(tmp_path / parent, folders)
    root, _ = data.resolve_root(tmp_path)
    assert root == tmp_path / parent


def test_original_is_preferred_over_segmented_copy(tmp_path):
    make_tree(tmp_path / "Original", RELEASE_3256)
    make_tree(tmp_path / "Segmented", RELEASE_3256)
    assert data.resolve_root(tmp_path)[0] == tmp_path / "Original"


def test_two_unnamed_copies_are_ambiguous(tmp_path):
    make_tree(tmp_path / "a", RELEASE_3256)
    make_tree(tmp_path / "b", RELEASE_3256)
    with pytest.raises(data.DatasetError, match="several datasets"):
        data.resolve_root(tmp_path)


def test_unknown_class_folder_lists_found_and_expected(tmp_path):
    make_tree(tmp_path, (*RELEASE_3256, "Myeloid"))
    with pytest.raises(data.DatasetError) as error:
        data.resolve_root(tmp_path)
    message = str(error.value)
    assert "unknown class folder(s) ['Myeloid']" in message
    assert "found ['Benign', 'Early', 'Myeloid', 'Pre', 'Pro']" in message
    assert "expected Benign, Early, Pre, Pro" in message


def test_missing_class_and_bad_directories(tmp_path):
    make_tree(tmp_path / "three", RELEASE_3256[:3])
    with pytest.raises(data.DatasetError, match=r"class folder\(s\) for \['Pro-B'\] missing"):
        data.resolve_root(tmp_path / "three")
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.resolve_root(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match="is empty"):
        data.resolve_root(tmp_path / "empty")
    flat = tmp_path / "flat"  # images without class folders: not "empty"
    flat.mkdir()
    for i in range(3):
        (flat / f"img{i}.jpg").write_bytes(b"x")
    with pytest.raises(data.DatasetError, match=r"holds 3 file\(s\) and no folders \(e.g. 'img0"):
        data.resolve_root(flat)
    (tmp_path / "other" / "photos").mkdir(parents=True)
    with pytest.raises(data.DatasetError, match="no class folders"):
        data.resolve_root(tmp_path / "other")


def test_list_images_filters_suffixes_and_sorts(tmp_path):
    root = make_tree(tmp_path, RELEASE_3256, files_per_folder=1)
    (root / "Pre" / "notes.txt").write_text("hello")
    (root / "Pre" / "B.PNG").write_bytes(b"x")
    (root / "Pre" / ".hidden.jpg").write_bytes(b"x")
    files, ignored = data.list_images(root, data.resolve_root(root)[1])
    assert [f.path for f in files] == [
        "Benign/img-001.jpg",
        "Early/img-001.jpg",
        "Pre/B.PNG",
        "Pre/img-001.jpg",
        "Pro/img-001.jpg",
    ]
    assert ignored == ["Pre/notes.txt"]
    assert files[2].class_name == "Pre-B" and files[2].label == 2


def test_duplicate_pairs_exact_and_near():
    sha = ["a", "b", "a", "c", "d"]
    dh = [0b0, 0b1111 << 20, 0b0, 0b0111 << 20, (2**64 - 1)]
    exact, near = split.duplicate_pairs(sha, dh, max_distance=1)
    assert exact == [(0, 2, 0)]
    assert near == [(1, 3, 1)]
    _, none = split.duplicate_pairs(sha, dh, max_distance=0)
    assert none == []


def test_index_blocks_and_duplicates_share_groups():
    paths = [f"Pro/WBC-Malignant-Pro-{n:03d}.jpg" for n in (1, 24, 25, 48, 49)] + [
        "Pre/WBC-Malignant-Pre-001.jpg",
        "Pre/x.jpg",
    ]
    assert split.file_number(paths[1]) == 24
    assert split.file_number("Pre/x.jpg") is None
    by_image = split.assign_groups(paths, [(0, 4, 0)], "image")
    assert by_image == [0, 1, 2, 3, 0, 4, 5]
    by_block = split.assign_groups(paths, [], "index-block", block_size=24)
    # 1 and 24 share a block, 25 and 48 the next; the same number in another folder does not.
    assert by_block == [0, 0, 1, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="unsupported group_by"):
        split.assign_groups(paths, [], "patient")


@pytest.mark.parametrize(
    "text, message",
    [
        ("0.7,0.2,0.2", "sum to 1"),
        ("0.7,0.3", "three numbers"),
        ("a,b,c", "three numbers"),
        ("1.2,-0.1,-0.1", ">= 0"),
        ("0.85,0.15,0", "train, val and test"),
        ("0.85,0,0.15", "train, val and test"),
    ],
)
def test_bad_fractions(text, message):
    with pytest.raises(ValueError, match=message):
        split.parse_fractions(text)


def test_stratified_split_singletons_hits_exact_counts():
    labels = [0] * 336 + [1] * 649 + [2] * 648 + [3] * 540
    splits = split.stratified_group_split(labels, list(range(len(labels))), (0.7, 0.15, 0.15), 1)
    for label, n in Counter(labels).items():
        counts = Counter(s for s, lab in zip(splits, labels) if lab == label)
        assert abs(counts["val"] - 0.15 * n) <= 1 and abs(counts["test"] - 0.15 * n) <= 1
        assert sum(counts.values()) == n
    again = split.stratified_group_split(labels, list(range(len(labels))), (0.7, 0.15, 0.15), 1)
    other = split.stratified_group_split(labels, list(range(len(labels))), (0.7, 0.15, 0.15), 2)
    assert splits == again and splits != other


def test_groups_never_straddle_splits():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(120), rng.integers(1, 6, 120)).tolist()
    labels = [g % 4 for g in groups]
    splits = split.stratified_group_split(labels, groups, (0.7, 0.15, 0.15), 0)
    split_of = {}
    for group, name in zip(groups, splits):
        assert split_of.setdefault(group, name) == name
    fractions = Counter(splits)
    assert 0.6 < fractions["train"] / len(splits) < 0.8


def test_manifest_bytes_are_sorted_and_stable(tmp_path):
    row = dict.fromkeys(data.MANIFEST_COLUMNS, "x")
    rows = [{**row, "path": "b"}, {**row, "path": "a"}]
    first = data.manifest_bytes(rows)
    assert first == data.manifest_bytes(rows[::-1])
    assert first.decode().splitlines()[1].startswith("a,")
    (tmp_path / "m.csv").write_bytes(first)
    with pytest.raises(data.DatasetError, match="unknown class"):
        data.read_manifest(tmp_path / "m.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(data.DatasetError, match="lacks column"):
        data.read_manifest(tmp_path / "bad.csv")
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.read_manifest(tmp_path / "missing.csv")
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)  # a tarball passed by mistake
    with pytest.raises(data.DatasetError, match=r"binary.csv' is not a UTF-8 CSV"):
        data.read_manifest(tmp_path / "binary.csv")
    (tmp_path / "nul.csv").write_bytes(b"path,class,split,sha256\na\x00,Benign,train,x\n")
    with pytest.raises(data.DatasetError, match=r"nul.csv' is not a UTF-8 CSV"):
        data.read_manifest(tmp_path / "nul.csv")
