"""The preprocess step end to end on small synthetic data: outputs, cache, leakage, bad input."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukemia import images, synthetic
from leukemia.data import DatasetError
from leukemia.preprocess import preprocess
from leukemia.segmentation import SegmentationParams, preprocess_image
from leukemia.split import SplitParams

from .conftest import REAL_DATA, requires_real_data


def read_rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def run(data_dir, out_dir, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 2)
    return preprocess(data_dir, out_dir, **kwargs)


def test_masked_rgb_is_stored_in_colour_and_is_its_own_cache_entry(synthetic_dir, tmp_path):
    gray = run(synthetic_dir, tmp_path / "out")
    colour = run(synthetic_dir, tmp_path / "out", seg=SegmentationParams(output="masked-rgb"))
    assert colour.out_dir != gray.out_dir and not colour.cache_hit
    assert colour.params["segmentation"]["output"] == "masked-rgb"
    for row in read_rows(colour.out_dir)[::7]:
        source = images.read_image(synthetic_dir / row["path"])
        written = images.read_png(colour.out_dir / row["processed"])
        expected = preprocess_image(source, SegmentationParams(output="masked-rgb"))
        np.testing.assert_array_equal(written, expected)
        assert not np.array_equal(written[..., 0], written[..., 2])  # colour, not gray


def test_stain_norm_is_fitted_on_the_training_split_and_keeps_the_split(synthetic_dir, tmp_path):
    from leukemia.data import split_fingerprint
    from leukemia.segmentation import fit_stain_reference, normalise_stain, resize

    options = {"segment": False, "image_size": 64}
    raw = run(synthetic_dir, tmp_path / "out", seg=SegmentationParams(**options))
    stained = run(
        synthetic_dir, tmp_path / "out", seg=SegmentationParams(**options, stain_norm="reinhard")
    )
    assert stained.out_dir != raw.out_dir
    rows = read_rows(stained.out_dir)
    # The same split as every other arm (the hashes come from the images before normalising).
    assert split_fingerprint(rows) == split_fingerprint(read_rows(raw.out_dir))
    # The reference: the training images only, as the model sees them (resized).
    train = [r for r in rows if r["split"] == "train"]
    reference = fit_stain_reference(
        resize(images.read_image(synthetic_dir / r["path"]), 64) for r in train
    )
    stored = stained.params["segmentation"]["stain_reference"]
    np.testing.assert_allclose(stored, reference, rtol=1e-5)
    params = SegmentationParams(**options, stain_norm="reinhard", stain_reference=stored)
    for row in rows[::9]:
        source = images.read_image(synthetic_dir / row["path"])
        written = images.read_png(stained.out_dir / row["processed"])
        np.testing.assert_array_equal(written, preprocess_image(source, params))
        np.testing.assert_array_equal(written, normalise_stain(resize(source, 64), stored))
    with pytest.raises(ValueError, match="needs the stain reference"):
        preprocess_image(source, SegmentationParams(**options, stain_norm="reinhard"))


def test_outputs_match_the_operator_and_the_manifest(synthetic_dir, tmp_path):
    result = run(synthetic_dir, tmp_path / "out")
    out = result.out_dir
    assert not result.cache_hit
    assert out.parent == tmp_path / "out" and out.name == result.params["cache_key"][:16]
    assert (tmp_path / "out" / "latest").resolve() == out.resolve()
    assert {p.name for p in out.iterdir()} == {
        ".build.json",
        "images",
        "manifest.csv",
        "audit.json",
        "params.json",
        "preview.png",
    }
    rows = read_rows(out)
    assert len(rows) == 32 and result.counts["images"] == 32
    assert list(rows[0]) == [
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
    ]
    for row in rows[::5]:
        source = images.read_image(synthetic_dir / row["path"])
        written = images.read_png(out / row["processed"])
        np.testing.assert_array_equal(written, preprocess_image(source))
        assert row["processed"] == "images/" + row["path"][:-4] + ".png"
    assert Counter(r["split"] for r in rows) == {"train": 24, "val": 4, "test": 4}
    audit = json.loads((out / "audit.json").read_text())
    assert audit["classes"]["Pro-B"]["images"] == 8
    assert audit["classes"]["Pro-B"]["folder"] == "Pro"
    assert audit["classes"]["Benign"]["sizes"] == {"224x224": 8}
    assert len(audit["classes"]["Benign"]["mean_rgb"]) == 3
    preview = cv2.imread(str(out / "preview.png"))
    assert preview.shape[0] > 4 * 3 * 224 and preview.shape[1] > 3 * 224


def test_cache_hit_and_changed_parameter(synthetic_dir, tmp_path):
    first = run(synthetic_dir, tmp_path / "out")
    start = time.perf_counter()
    again = run(synthetic_dir, tmp_path / "out")
    assert again.cache_hit and time.perf_counter() - start < 1.0
    assert again.params["cache_key"] == first.params["cache_key"]
    before = {p: p.stat().st_mtime_ns for p in first.out_dir.rglob("*")}
    changed = run(synthetic_dir, tmp_path / "out", seg=SegmentationParams(kernel_size=3))
    assert not changed.cache_hit
    assert changed.params["cache_key"] != first.params["cache_key"]
    assert changed.params["segmentation"]["kernel_size"] == 3
    assert changed.out_dir != first.out_dir, "a new option set makes a new folder"
    assert {p: p.stat().st_mtime_ns for p in first.out_dir.rglob("*")} == before, "immutable"
    assert (tmp_path / "out" / "latest").resolve() == changed.out_dir.resolve()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [".leukemia-store.json", "latest", first.out_dir.name, changed.out_dir.name]
    ), "no temporary folders left behind"
    assert run(synthetic_dir, tmp_path / "out").out_dir == first.out_dir
    assert (tmp_path / "out" / "latest").resolve() == first.out_dir.resolve()


def test_same_input_same_manifest_bytes(synthetic_dir, tmp_path):
    a = run(synthetic_dir, tmp_path / "a", workers=1)
    b = run(synthetic_dir, tmp_path / "b", workers=2)
    assert a.manifest.read_bytes() == b.manifest.read_bytes()
    c = run(synthetic_dir, tmp_path / "c", split=SplitParams(seed=7))
    assert a.manifest.read_bytes() != c.manifest.read_bytes()


def test_manifest_reuse_gives_the_identical_split(synthetic_dir, tmp_path):
    proposed = run(synthetic_dir, tmp_path / "seg")
    baseline = run(
        synthetic_dir,
        tmp_path / "raw",
        seg=SegmentationParams(segment=False),
        manifest=proposed.manifest,
        split=SplitParams(seed=999),
    )
    assert proposed.manifest.read_bytes() == baseline.manifest.read_bytes()
    row = read_rows(baseline.out_dir)[0]
    written = images.read_png(baseline.out_dir / row["processed"])
    np.testing.assert_array_equal(written, images.read_image(synthetic_dir / row["path"]))
    audit = json.loads((baseline.out_dir / "audit.json").read_text())
    assert audit["split"]["source"] == "manifest"


def test_duplicates_never_straddle_splits(dataset_copy, tmp_path):
    pro = sorted((dataset_copy / "Pro").iterdir())
    for k, source in enumerate(pro[:4]):
        shutil.copy(source, dataset_copy / "Pro" / f"WBC-Malignant-Pro-{200 + k}.jpg")
        rgb = images.read_image(source)
        ok, jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 70])
        (dataset_copy / "Pro" / f"WBC-Malignant-Pro-{300 + k}.jpg").write_bytes(jpeg.tobytes())
    result = run(dataset_copy, tmp_path / "out")
    rows = {r["path"]: r for r in read_rows(result.out_dir)}
    audit = json.loads((result.out_dir / "audit.json").read_text())
    assert result.counts["exact_duplicate_groups"] == 4
    assert result.counts["near_duplicate_groups"] >= 4
    for k, source in enumerate(pro[:4]):
        trio = [
            f"Pro/{source.name}",
            f"Pro/WBC-Malignant-Pro-{200 + k}.jpg",
            f"Pro/WBC-Malignant-Pro-{300 + k}.jpg",
        ]
        assert len({rows[p]["group"] for p in trio}) == 1
        assert len({rows[p]["split"] for p in trio}) == 1
    assert sorted(audit["exact_duplicates"][0]["paths"])[0].startswith("Pro/")
    assert audit["cross_class_duplicates"] == []


def test_index_blocks_keep_neighbours_together(dataset_copy, tmp_path):
    result = run(
        dataset_copy,
        tmp_path / "out",
        split=SplitParams(group_by="index-block", block_size=2, fractions=(0.5, 0.25, 0.25)),
    )
    splits_per_block = defaultdict(set)
    for row in read_rows(result.out_dir):
        number = int(row["path"].rsplit("-", 1)[1][:3])
        splits_per_block[(row["class"], (number - 1) // 2)].add(row["split"])
    assert all(len(s) == 1 for s in splits_per_block.values())
    assert result.counts["groups"] == 16


def test_unreadable_files_are_skipped_listed_and_bounded(dataset_copy, tmp_path):
    (dataset_copy / "Pre" / "zero.jpg").write_bytes(b"")
    (dataset_copy / "Pre" / "text.png").write_text("not a picture")
    good = (dataset_copy / "Pre" / "WBC-Malignant-Pre-001.jpg").read_bytes()
    (dataset_copy / "Pro" / "cut.jpg").write_bytes(good[: len(good) // 3])
    (dataset_copy / "Pro" / "readme.txt").write_text("ignored")

    with pytest.raises(DatasetError, match=r"3 of 35 image files are unreadable.*Pre/text.png"):
        run(dataset_copy, tmp_path / "strict")
    assert not (tmp_path / "strict").exists(), "a failed run leaves nothing behind"

    result = run(dataset_copy, tmp_path / "out", max_unreadable=0.1)
    audit = json.loads((result.out_dir / "audit.json").read_text())
    reasons = {u["path"]: u["reason"] for u in audit["unreadable"]}
    assert reasons["Pre/zero.jpg"].startswith("empty file")
    assert reasons["Pre/text.png"].startswith("not an image")
    assert "truncated" in reasons["Pro/cut.jpg"]
    assert audit["ignored_files"] == ["Pro/readme.txt"]
    assert result.counts["images"] == 32 and result.counts["unreadable"] == 3
    assert "Pro/cut.jpg" not in {r["path"] for r in read_rows(result.out_dir)}


def test_a_class_without_readable_images(dataset_copy, tmp_path):
    for path in (dataset_copy / "Benign").iterdir():
        path.write_bytes(b"broken")
    with pytest.raises(DatasetError, match="class 'Benign' has no readable images"):
        run(dataset_copy, tmp_path / "out", max_unreadable=1.0)
    assert not (tmp_path / "out").exists()


def test_manifest_naming_missing_or_changed_files(dataset_copy, tmp_path):
    first = run(dataset_copy, tmp_path / "first")
    (dataset_copy / "Pre" / "WBC-Malignant-Pre-002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"names 1 file\(s\) not found.*Pre-002"):
        run(dataset_copy, tmp_path / "second", manifest=first.manifest)
    shutil.copy(
        dataset_copy / "Pre" / "WBC-Malignant-Pre-001.jpg",
        dataset_copy / "Pre" / "WBC-Malignant-Pre-002.jpg",
    )
    with pytest.raises(DatasetError, match="changed since the manifest"):
        run(dataset_copy, tmp_path / "second", manifest=first.manifest)
    assert not (tmp_path / "second").exists()


def test_refuses_to_overwrite_a_foreign_folder(synthetic_dir, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not written by leukemia preprocess"):
        run(synthetic_dir, foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_bad_options():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitParams(fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="unsupported group_by"):
        SplitParams(group_by="slide")
    with pytest.raises(ValueError, match="max_unreadable"):
        preprocess(".", "out", max_unreadable=2)


def test_killed_run_leaves_no_output_that_looks_complete(tmp_path):
    data_dir = synthetic.generate(tmp_path / "data", per_class=60, seed=1)
    out = tmp_path / "out"
    script = (
        "from leukemia.preprocess import preprocess; "
        f"preprocess({str(data_dir)!r}, {str(out)!r}, workers=1, progress=False)"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temporaries = list(out.glob(".tmp-*"))
        if temporaries and len(list(temporaries[0].rglob("*.png"))) > 20:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the preprocess subprocess never started writing")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list(out.glob("*/params.json")), "a killed run leaves nothing that looks complete"
    assert list(out.glob(".tmp-*")), "the half-written temporary folder is separate"
    result = run(data_dir, out)
    assert not result.cache_hit and result.counts["images"] == 240
    assert not list(out.glob(".tmp-*")), "the next run cleans up after the killed one"


@requires_real_data
@pytest.mark.slow
def test_real_images_audit_and_leakage_free_split(tmp_path):
    result = run(REAL_DATA, tmp_path / "out", progress=False)
    counts = result.counts
    assert counts["images"] == 2173 and counts["unreadable"] == 0
    assert [counts[f"class_{c}"] for c in ("Benign", "Early_Pre_B", "Pre_B", "Pro_B")] == [
        336,
        649,
        648,
        540,
    ]
    audit = json.loads((result.out_dir / "audit.json").read_text())
    assert audit["exact_duplicates"], "the dataset holds byte-identical pairs"
    assert all(g["classes"] == ["Pro-B"] for g in audit["exact_duplicates"])
    rows = read_rows(result.out_dir)
    split_of = {r["path"]: r["split"] for r in rows}
    for group in audit["exact_duplicates"] + audit["near_duplicates"]["groups"]:
        assert len({split_of[p] for p in group["paths"]}) == 1, group
    # Pro-B is the palest class (the colour shortcut the README warns about).
    brightness = {c: v["mean_brightness"] for c, v in audit["classes"].items()}
    assert max(brightness, key=brightness.get) == "Pro-B"

    blocks = run(REAL_DATA, tmp_path / "blocks", split=SplitParams(group_by="index-block"))
    splits_per_block = defaultdict(set)
    for row in read_rows(blocks.out_dir):
        number = int(Path(row["path"]).stem.rsplit("-", 1)[1])
        splits_per_block[(row["class"], (number - 1) // 24)].add(row["split"])
    assert all(len(s) == 1 for s in splits_per_block.values())


def test_threaded_parent_reading_stdin_does_not_hang(synthetic_dir, tmp_path):
    """With a thread running, workers cannot be forked safely; a forkserver cannot re-import a
    main module read from stdin. Preprocessing must still finish (in process)."""
    script = (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "from leukemia.preprocess import preprocess\n"
        f"r = preprocess({str(synthetic_dir)!r}, {str(tmp_path / 'out')!r}, workers=2,"
        " progress=False)\n"
        "print(r.counts['images'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "32"


def test_opencv_used_before_the_workers_fork_does_not_hang_them(synthetic_dir, tmp_path):
    """A process that ran OpenCV on its thread pool (a preview, synthetic images), then forks
    preprocess workers: a worker's cv2.setNumThreads waited forever on pool threads the fork
    did not copy (the report test hung there). It is a race (on the old code about one attempt
    in three hung), so besides running the attempts the test checks its cause directly: the
    parent's pool is stopped (one thread) whenever workers were forked."""
    script = (
        "import cv2, numpy as np\n"
        "from leukemia.preprocess import preprocess\n"
        "image = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), np.uint8)\n"
        "for attempt in range(4):\n"
        "    cv2.setNumThreads(-1)  # OpenCV's default pool, as a fresh process has it\n"
        "    for _ in range(3):\n"
        "        cv2.GaussianBlur(image, (5, 5), 0)  # large enough to run on the pool\n"
        f"    r = preprocess({str(synthetic_dir)!r}, {str(tmp_path)!r} + f'/out{{attempt}}',"
        " workers=2, progress=False, preview_per_class=0)\n"
        "    print(r.counts['images'], cv2.getNumThreads())\n"
    )
    script_file = tmp_path / "fork_after_opencv.py"  # a file: so that the workers may fork
    script_file.write_text(script)
    done = subprocess.run(
        [sys.executable, str(script_file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:4] == ["32 1"] * 4


def test_a_read_only_store_is_reused_without_a_write(synthetic_dir, tmp_path):
    """Issue 23, item 12: the same options on a read-only mount that holds the output reuse it
    (it used to fail writing the ``latest`` link's temporary name)."""
    written = run(synthetic_dir, tmp_path / "out")
    (tmp_path / "out" / "latest").unlink()  # so that reuse would want to point it again
    mounted = tmp_path / "ro"
    mounted.mkdir()
    bind = subprocess.run(["mount", "--bind", str(tmp_path / "out"), str(mounted)], check=False)
    if bind.returncode != 0:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(mounted)]
        assert subprocess.run(remount, check=False).returncode == 0
        with pytest.raises(OSError):
            (mounted / "probe").write_text("x")  # really read-only
        again = run(synthetic_dir, mounted)
        assert again.cache_hit and again.out_dir == mounted / written.out_dir.name
        assert read_rows(again.out_dir) == read_rows(written.out_dir)
    finally:
        subprocess.run(["umount", str(mounted)], check=False)


def test_paired_images_share_one_split_or_say_which_two_differ(synthetic_dir, tmp_path):
    # compare's arms and confirm's configs both go through this: paired tests need one split.
    from leukemia.config import PreprocessConfig
    from leukemia.steps import preprocess as preprocess_step

    said = []
    options = {"baseline": PreprocessConfig(segment=False), "proposed": PreprocessConfig()}
    made = preprocess_step.paired(options, synthetic_dir, tmp_path / "out", "arms", said.append)
    assert list(made) == ["baseline", "proposed"] and made["proposed"].out_dir.is_dir()
    assert [line.split(" images:")[0] for line in said] == ["baseline", "proposed"]
    options["other"] = PreprocessConfig(split_seed=7)
    with pytest.raises(ValueError, match=r"the baseline and other arms split the data differently"):
        preprocess_step.paired(options, synthetic_dir, tmp_path / "out", "arms", said.append)
