"""The ``preprocess`` step: resolve the dataset, preprocess it into its cached folder, log it.

``run`` is what every command that trains calls first (preprocess, train, compare, main); the
``preprocess`` command also logs the result as a run of its own (``log``): the output folder's
files as artifacts, the options as params, the counts as metrics, the manifest as the run's
dataset input (see ``tracking.log_preprocess``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .. import synthetic, tracking
from ..config import PreprocessConfig
from ..data import read_manifest, split_fingerprint
from ..preprocess import PreprocessResult, open_output, preprocess

SYNTHETIC = "synthetic"  # --data-dir value: the generated demo data
SYNTHETIC_PER_CLASS = 60  # the demo's images per class: minutes on a CPU


def cache_dir() -> Path:
    """Where generated data and training state live: ``$LEUKEMIA_CACHE_DIR``, else
    ``~/.cache/leukemia``."""
    base = os.environ.get("LEUKEMIA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "leukemia"
    )
    return Path(base)


def resolve_data_dir(data_dir: str, per_class: int, seed: int) -> str:
    """``data_dir``, or for ``synthetic`` the generated dataset (cached by its options)."""
    if data_dir != SYNTHETIC:
        return data_dir
    target = cache_dir() / SYNTHETIC / f"per{per_class}-seed{seed}"
    return str(synthetic.generate(target, per_class=per_class, seed=seed))


DEFAULT_OUT_DIR = "processed"  # one store for every arm: an immutable folder per option set


def stored(processed: str, out_dir=None) -> PreprocessResult:
    """The folder a parent already built: a path, or a folder's name (its key) in the
    ``out_dir`` store, as a study passes it to its children. ``ValueError`` when it is neither."""
    path = Path(processed)
    if not path.exists() and len(path.parts) == 1:
        path = Path(out_dir or DEFAULT_OUT_DIR) / processed
    return open_output(path)


def run(
    data_dir,
    out_dir,
    manifest,
    pre: PreprocessConfig,
    workers: int = 0,
    progress: bool = True,
) -> tuple[PreprocessResult, float]:
    """Preprocess ``data_dir`` with ``pre``; returns the result and seconds. Raises
    ``DatasetError``, ``FileExistsError`` or ``ValueError`` for bad input."""
    start = time.perf_counter()
    result = preprocess(
        data_dir,
        out_dir,
        seg=pre.segmentation(),
        split=pre.split(),
        manifest=manifest,
        max_unreadable=pre.max_unreadable,
        max_pixels=pre.max_pixels,
        workers=workers,
        progress=progress,
    )
    return result, time.perf_counter() - start


def paired(
    options: dict[str, PreprocessConfig],
    data_dir,
    out_dir,
    what: str,
    echo,
    workers: int = 0,
    prefix: str = "",
) -> dict[str, PreprocessResult]:
    """Each named option set's images (``run``), checked to share one split, as paired tests
    need: ``{name: result}``. Each is echoed as "<prefix><name> images: ..." (``what`` names the
    kind of name, "arms" or "configs"); ``ValueError`` names the two that split differently."""
    made = {}
    for name, pre in options.items():
        made[name], seconds = run(data_dir, out_dir, None, pre, workers)
        echo(f"{prefix}{name} images: " + summary(made[name], seconds))
    first, *others = made
    expected = split_fingerprint(read_manifest(made[first].manifest))
    for name in others:
        if split_fingerprint(read_manifest(made[name].manifest)) != expected:
            raise ValueError(
                f"the {first} and {name} {what} split the data differently (their split "
                f"options differ); cannot pair them (manifests {made[first].manifest} and "
                f"{made[name].manifest})"
            )
    return made


def log(result: PreprocessResult, seconds: float, experiment: str | None) -> str:
    """Log ``result`` as a ``preprocess`` run; returns its id."""
    with tracking.start_run("preprocess", experiment) as run:
        tracking.log_preprocess(result, seconds)
    return run.info.run_id


def summary(result: PreprocessResult, seconds: float) -> str:
    counts = result.counts
    state = "cached, reused" if result.cache_hit else f"{counts['images'] / seconds:.0f} images/s"
    return (
        f"{counts['images']} images ({counts['train_images']} train, "
        f"{counts['val_images']} val, {counts['test_images']} test; "
        f"{counts['unreadable']} unreadable, {counts['exact_duplicate_groups']} exact and "
        f"{counts['near_duplicate_groups']} near-duplicate groups) -> {result.out_dir} "
        f"[{state}]"
    )
