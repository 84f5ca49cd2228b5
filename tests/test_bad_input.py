"""Bad input and failing file systems: one line naming what was expected, nothing half-written."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from leukemia import synthetic
from leukemia.cli import main
from leukemia.model import create_classifier

from .conftest import REPO

WEIGHTS = REPO.parent / "shared" / "weights" / "efficientnet_lite0.imagenet.safetensors"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, expected: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    # An exception other than click's exit is a crash, however short its message.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.output


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at ``path`` (root only; the test skips elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_broken_and_looping_symlinks_are_listed_as_unreadable(dataset_copy, tracking_uri):
    (dataset_copy / "Pre" / "broken.jpg").symlink_to("/nonexistent/file.jpg")
    (dataset_copy / "Pro" / "loop.jpg").symlink_to("loop.jpg")
    (dataset_copy / "Pro" / "cycle").symlink_to("..")  # a folder cycle is not followed
    strict = invoke("preprocess", "--data-dir", dataset_copy, "--out-dir", "strict")
    one_line_error(strict, "2 of 34 image files are unreadable")
    assert "cannot read the file (No such file or directory)" in strict.output
    ok = invoke(
        "preprocess", "--data-dir", dataset_copy, "--out-dir", "out", "--max-unreadable", "0.1"
    )
    assert ok.exit_code == 0, ok.output
    audit = json.loads(Path("out", "latest", "audit.json").read_text())
    reasons = {u["path"]: u["reason"] for u in audit["unreadable"]}
    assert reasons["Pro/loop.jpg"] == "cannot read the file (Too many levels of symbolic links)"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["preprocess", "--kernel-size", "100001"], "odd integer from 1 to 255, got 100001"),
        (["preprocess", "--image-size", "1000000"], "from 8 to 2048 pixels, got 1000000"),
        (["synth", "out", "--size", "1000000"], "1000000 is not in the range 32<=x<=4096"),
        (["train", "--phase1_lr", "inf"], "phase1_lr must be a finite number > 0, got inf"),
        (["train", "--phase2_lr", "nan"], "phase2_lr must be a finite number > 0, got nan"),
        (["train", "--weight_decay", "nan"], "weight_decay must be a finite number >= 0"),
        (["train", "--weight_decay", "inf"], "weight_decay must be a finite number >= 0"),
        (["train", "--seed", "-1"], "Invalid value for '--seed': -1 is not in the range x>=0"),
        (["train", "--split-seed", "-1"], "split_seed must be >= 0, got -1"),
        (["train", "--image_size", "5000"], "image_size must be from 8 to 2048 pixels, got 5000"),
    ],
)
def test_out_of_range_options_are_one_line_errors(args, expected, tracking_uri):
    one_line_error(invoke(*args), expected)


def test_corrupt_pretrained_weights_are_one_line_errors(tmp_path, tracking_uri):
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    bad_pth = tmp_path / "bad.pth"
    bad_pth.write_bytes(b"garbage")
    for path in (bad_safetensors, bad_pth):
        with pytest.raises(ValueError, match="is not a readable state dict"):
            create_classifier("test_efficientnet", pretrained=str(path))
        one_line_error(
            invoke(
                "train",
                "--config",
                REPO / "experiments" / "demo.yaml",
                "--synthetic-per-class",
                "8",
                "--pretrained",
                path,
            ),
            "is not a readable state dict",
        )


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"no shared weights at {WEIGHTS}")
def test_truncated_real_weights_are_refused(tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(WEIGHTS.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="is not a readable state dict"):
        create_classifier("efficientnet_lite0", pretrained=str(cut))


def test_read_only_and_full_output_file_systems(synthetic_dir, tmp_path, tracking_uri):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as read_only:
        result = invoke("preprocess", "--data-dir", synthetic_dir, "--out-dir", read_only / "out")
        one_line_error(result, "Read-only file system")
    with tmpfs(tmp_path / "full", "size=64k") as full:
        result = invoke("preprocess", "--data-dir", synthetic_dir, "--out-dir", full / "out")
        one_line_error(result, "No space left on device")
        assert not (full / "out").exists(), "nothing half-written is left"


def test_an_out_dir_that_is_a_mount_point_works(synthetic_dir, tmp_path, tracking_uri):
    with tmpfs(tmp_path / "volume", "size=64m") as volume:
        first = invoke("preprocess", "--data-dir", synthetic_dir, "--out-dir", volume)
        assert first.exit_code == 0, first.output
        again = invoke(
            "preprocess", "--data-dir", synthetic_dir, "--out-dir", volume, "--kernel-size", "3"
        )
        assert again.exit_code == 0, again.output
        assert len([p for p in volume.glob("*/manifest.csv") if not p.parent.is_symlink()]) == 2


def test_synthetic_size_bound_in_the_library(tmp_path):
    with pytest.raises(ValueError, match="size must be from 32 to 4096 pixels, got 5000"):
        synthetic.generate(tmp_path / "s", per_class=1, size=5000)


def test_a_path_component_too_long_is_one_line(tmp_path, monkeypatch):
    """Issue 23, item 11: a 300-character folder name was an OSError traceback."""
    monkeypatch.chdir(tmp_path)
    long = tmp_path / ("a" * 300)
    for args in (["--synthetic-per-class", "8", "--out-dir", long], ["--data-dir", long]):
        one_line_error(invoke("preprocess", *args), "File name too long")
    assert list(tmp_path.iterdir()) == []


def test_a_disk_full_while_saving_the_training_state_leaves_nothing_half_written(
    small_processed, tmp_path
):
    """Issue 23, item 11: torch.save onto a full disk was a RuntimeError traceback and left a
    .state.pt.tmp behind; now it is ENOSPC (one line from any command) and no temporary."""
    import errno

    from leukemia.config import load_config
    from leukemia.train import train

    config = load_config(REPO / "experiments" / "demo.yaml", {"phase1_epochs": 1})
    with tmpfs(tmp_path / "full", "size=64k") as full:
        with pytest.raises(OSError) as raised:
            train(config, small_processed, full / "work")
        assert raised.value.errno == errno.ENOSPC
        assert [p.name for p in (full / "work").iterdir()] == []


def test_a_full_artifact_store_names_its_folder_and_fails_the_run(tracking_uri, tmp_path):
    """Issue 23, Smaller: a full artifact store's error named a temporary file of the copy
    (/tmp/tmpXXXX); now the store's folder that nothing more fits in, and the run is FAILED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    with tmpfs(tmp_path / "full", "size=64k") as full:
        client.create_experiment("full", artifact_location=(full / "art").as_uri())
        result = invoke(
            "train", "--experiment", "full", "--synthetic-per-class", "8", "--phase1_epochs", "1",
            "--phase2_epochs", "1", "--registered-model-name", "",
        )  # fmt: skip
        one_line_error(result, f"No space left on device: nothing more fits in {full / 'art'}/")
    runs = client.search_runs([client.get_experiment_by_name("full").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("step") == "train"] == ["FAILED"]
