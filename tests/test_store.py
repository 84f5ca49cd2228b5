"""Preprocess outputs: nothing removed that is not ours, immutable keyed folders under
concurrency, no output inside the dataset, workers that die with their parent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leukemia import synthetic
from leukemia.data import DatasetError
from leukemia.preprocess import preprocess
from leukemia.segmentation import SegmentationParams
from leukemia.split import SplitParams
from leukemia.store import OutputStore, StoreError


def run(data_dir, out_dir, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 1)
    return preprocess(data_dir, out_dir, **kwargs)


def test_never_removes_folders_it_did_not_create(synthetic_dir, tmp_path):
    work = tmp_path / "work"
    # Look-alikes of the old temporary names beside the output, and a glob pattern as a name.
    keep = [
        work / ".processed.bak-2024-01",
        work / ".processed.tmp-1-2-3",
        tmp_path / ".ssh.backup-2020-01",
    ]
    for folder in keep:
        folder.mkdir(parents=True)
        (folder / "precious.txt").write_text("mine")
    run(synthetic_dir, work / "processed")
    run(synthetic_dir, tmp_path / "*")
    # Inside our own root: a temporary-looking folder without our build record, one whose
    # record names a live process, and one whose record names another host.
    root = work / "processed"
    unproven = root / (".tmp-" + "a" * 32)
    alive = root / (".tmp-" + "b" * 32)
    elsewhere = root / (".tmp-" + "c" * 32)
    for folder in (unproven, alive, elsewhere):
        folder.mkdir()
        (folder / "precious.txt").write_text("mine")
    record = {"written_by": "leukemia preprocess", "pid": os.getpid()}
    start = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
    (alive / ".build.json").write_text(
        json.dumps({**record, "host": os.uname().nodename, "process_start": start})
    )
    (elsewhere / ".build.json").write_text(
        json.dumps({**record, "pid": 2**22 - 7, "host": "another-host", "process_start": "1"})
    )
    run(synthetic_dir, root, seg=SegmentationParams(kernel_size=3))
    for folder in [*keep, unproven, alive, elsewhere]:
        assert (folder / "precious.txt").read_text() == "mine", folder


def test_a_foreign_or_old_layout_out_dir_is_refused_untouched(synthetic_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "params.json").write_text(json.dumps({"written_by": "leukemia preprocess"}))
    (old / "manifest.csv").write_text("path\n")
    with pytest.raises(StoreError, match="older leukemia preprocess"):
        run(synthetic_dir, old)
    assert sorted(p.name for p in old.iterdir()) == ["manifest.csv", "params.json"]
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        run(synthetic_dir, afile)


def test_a_root_holding_only_older_per_arm_stores_is_taken_over(synthetic_dir, tmp_path):
    """Earlier versions kept processed/segmented and processed/raw as separate stores; the
    shared processed/ store takes that folder over, keeping both. A foreign file beside them
    still makes it refused."""
    root = tmp_path / "processed"
    older = run(synthetic_dir, root / "segmented").out_dir
    run(synthetic_dir, root / "raw", seg=SegmentationParams(segment=False))
    result = run(synthetic_dir, root)
    assert result.out_dir.parent == root and not result.cache_hit
    assert older.is_dir() and (root / "raw").is_dir()
    other = tmp_path / "mixed"
    run(synthetic_dir, other / "segmented")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and was not written by"):
        run(synthetic_dir, other)
    assert (other / "notes.txt").read_text() == "mine"


def test_an_empty_existing_out_dir_is_used_in_place(synthetic_dir, tmp_path):
    """A mount point (a Docker volume) cannot be renamed or replaced: the root stays put."""
    root = tmp_path / "volume"
    root.mkdir()
    inode = root.stat().st_ino
    result = run(synthetic_dir, root)
    assert result.out_dir.parent == root and root.stat().st_ino == inode
    assert run(synthetic_dir, root).cache_hit


def test_out_dir_inside_the_dataset_and_dataset_inside_out_dir(dataset_copy, tmp_path):
    with pytest.raises(DatasetError, match="inside the dataset"):
        run(dataset_copy, dataset_copy / "Benign" / "processed")
    with pytest.raises(DatasetError, match="inside the dataset"):
        run(dataset_copy, dataset_copy)
    assert not (dataset_copy / "Benign" / "processed").exists()
    with pytest.raises(DatasetError, match="inside --out-dir"):
        run(dataset_copy, tmp_path)


def test_a_split_without_validation_images_is_refused(tmp_path):
    data_dir = synthetic.generate(tmp_path / "data", per_class=2, seed=1)
    with pytest.raises(DatasetError, match="the split leaves no (val|test)"):
        run(data_dir, tmp_path / "out", split=SplitParams(fractions=(0.5, 0.25, 0.25)))
    with pytest.raises(ValueError, match="val and test fractions must be > 0"):
        SplitParams(fractions=(0.8, 0.0, 0.2))


def _preprocess_script(data_dir, out_dir, kernel: int) -> str:
    return (
        "import json\n"
        "from leukemia.preprocess import preprocess\n"
        "from leukemia.segmentation import SegmentationParams\n"
        f"r = preprocess({str(data_dir)!r}, {str(out_dir)!r}, workers=1, progress=False,"
        f" seg=SegmentationParams(kernel_size={kernel}))\n"
        "print(json.dumps({'out': str(r.out_dir), 'kernel':"
        " r.params['segmentation']['kernel_size']}))\n"
    )


@pytest.mark.slow
def test_concurrent_writers_of_one_root(synthetic_dir, tmp_path):
    """Three writers of one key make one complete folder; writers of three keys make three,
    each recording its own kernel."""
    out = tmp_path / "out"

    def launch(kernels):
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", _preprocess_script(synthetic_dir, out, k)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for k in kernels
        ]
        results = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-2000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        return results

    same = launch([5, 5, 5])
    assert len({r["out"] for r in same}) == 1
    different = launch([5, 7, 9])
    assert [r["kernel"] for r in different] == [5, 7, 9]
    assert len({r["out"] for r in different}) == 3
    for r in different:
        params = json.loads(Path(r["out"], "params.json").read_text())
        assert params["segmentation"]["kernel_size"] == r["kernel"]
        assert len(list(Path(r["out"], "images").rglob("*.png"))) == 32
    assert not list(out.glob(".tmp-*"))


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(t) for t in text)
    return found


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        with contextlib.suppress(FileNotFoundError):
            for child in _children(todo.pop()):
                found.add(child)
                todo.append(child)
    return found


def _alive(pids) -> list[int]:
    """The pids that are still running (not gone, not zombies)."""
    alive = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.append(pid)
    return alive


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
# "threaded": a parent with a second thread (a search worker on PostgreSQL runs Optuna's
# heartbeat) starts its workers through a forkserver, whose workers are not its children: they
# used to outlive it, with the forkserver and the resource tracker (issue 23, item 8).
@pytest.mark.parametrize("parent_kind", ["plain", "threaded"])
def test_workers_exit_when_the_parent_is_killed(tmp_path, parent_kind):
    data_dir = synthetic.generate(tmp_path / "data", per_class=60, seed=1)
    thread = "import threading, time\nthreading.Thread(target=time.sleep, args=(600,)).start()\n"
    script = (
        (thread if parent_kind == "threaded" else "")
        + "from leukemia.preprocess import preprocess\n"
        f"preprocess({str(data_dir)!r}, {str(tmp_path / 'out')!r}, workers=2, progress=False)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    # Two workers, plus the forkserver and the resource tracker when the parent is threaded.
    expected = 2 if parent_kind == "plain" else 4
    deadline = time.monotonic() + 60
    helpers: set[int] = set()
    while time.monotonic() < deadline and len(helpers) < expected:
        helpers = _descendants(parent.pid)
        time.sleep(0.05)
    assert len(helpers) >= expected, "the preprocess never started its workers"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(helpers):
        time.sleep(0.1)
    assert not _alive(helpers), f"{_alive(helpers)} outlived their killed parent"
    # The next run removes the killed run's temporary folder: it is provably ours.
    assert run(data_dir, tmp_path / "out").counts["images"] == 240
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_store_publish_keeps_the_first_complete_folder(tmp_path):
    store = OutputStore(tmp_path / "root", "tester").open()
    key = "f" * 64

    def read_key(folder):
        path = folder / "key"
        return path.read_text() if path.is_file() else None

    first, second = store.new_temporary(), store.new_temporary()
    for folder, text in ((first, "one"), (second, "two")):
        (folder / "content").write_text(text)
        (folder / "key").write_text(key)
    assert store.publish(first, key, read_key) == (store.path(key), True)
    assert store.publish(second, key, read_key) == (store.path(key), False)
    assert (store.path(key) / "content").read_text() == "one"
    assert not second.exists()
    with pytest.raises(StoreError, match="another program|not written by"):
        OutputStore(tmp_path / "root", "someone else").open()


def test_synthetic_data_is_never_replaced(tmp_path):
    first = synthetic.generate(tmp_path / "synth", per_class=1, seed=0, size=32)
    (first / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other options \\(seed 0, now 1\\)"):
        synthetic.generate(first, per_class=1, seed=1, size=32)
    assert (first / "notes.txt").read_text() == "mine"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "synthetic.json").write_text("{}")
    with pytest.raises(FileExistsError, match="is not a synthetic dataset"):
        synthetic.generate(foreign, per_class=1, size=32)
    assert synthetic.generate(first, per_class=1, seed=0, size=32) == first
