"""The ``preprocess`` step: audit, split and segment a dataset into a cached output folder.

Each option set gets its own immutable folder ``<out_dir>/<key[:16]>/`` (see ``store``; the
cache key covers the input files and every option), and ``<out_dir>/latest`` points at the most
recent one. A folder holds:

- ``images/<class folder>/<name>.png``: what the model sees, lossless, mirroring the input;
- ``manifest.csv``: one row per usable image (path, class, label, split, group, sha256, ...);
- ``audit.json``: counts, sizes, colour, unreadable files, exact and near-duplicate groups;
- ``params.json``: every option, the cache key and the counts;
- ``preview.png``: original, mask and model input for a few images per class.

A folder appears only complete (built in a temporary folder, then renamed) and is never
rewritten, so a training run reading it is never disturbed by another preprocess. A later call
with the same input files and options finds it and returns at once.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from . import data, images, processes
from .audit import rows_and_audit
from .preview import write_preview
from .segmentation import SegmentationParams, fit_stain_reference, preprocess_planes, resize
from .split import SplitParams
from .store import OutputStore

# Bump when a change to this module or to segmentation.py changes what is written.
PIPELINE_VERSION = 1
OWNER_MARK = "leukemia preprocess"
MAX_UNREADABLE = 0.01  # more unreadable files than this fraction fails the run


@dataclass
class PreprocessResult:
    out_dir: Path
    cache_hit: bool
    params: dict
    counts: dict = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return self.out_dir / "manifest.csv"


def cache_key(
    files: list[data.ImageFile],
    seg: SegmentationParams,
    split: SplitParams,
    max_pixels: int,
    manifest_sha256: str | None,
) -> str:
    """sha256 over everything that decides the output: files (path, size, mtime) and options."""
    digest = hashlib.sha256()
    header = {
        "version": PIPELINE_VERSION,
        "segmentation": asdict(seg),
        "split": asdict(split),
        "max_pixels": max_pixels,
        "manifest": manifest_sha256,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for f in files:
        digest.update(f"\n{f.path}\t{f.size}\t{f.mtime_ns}".encode())
    return digest.hexdigest()


def output_name(path: str, taken: set[str]) -> str:
    """``Benign/a.jpg`` -> ``images/Benign/a.png`` (``a.jpg.png`` if ``a.png`` is taken)."""
    candidate = "images/" + str(Path(path).with_suffix(".png").as_posix())
    if candidate in taken:
        candidate = f"images/{path}.png"
    taken.add(candidate)
    return candidate


# ---------------------------------------------------------------------------------------------
# Per-image work, run in worker processes


_worker: dict = {}


def _init_worker(
    source_root: str, target_root: str, seg: SegmentationParams, max_pixels: int, owner: str
):
    cv2.setNumThreads(1)  # one image per process; OpenCV's own threads would only contend
    _worker.update(source=source_root, target=target_root, seg=seg, max_pixels=max_pixels)
    if multiprocessing.parent_process() is not None:
        threading.Thread(target=_exit_with_owner, args=(owner,), daemon=True).start()


def _exit_with_owner(owner: str, interval: float = 0.5) -> None:
    """End this worker once the process that started the pool (``owner``, a process token) is
    gone, killed with SIGKILL say: a worker waiting on the task queue would otherwise block
    forever, since it holds the queue's write end too. The owner, not the parent: a
    forkserver's workers are its children, and the forkserver waits for them (each holds its
    'alive' pipe) before it exits, so a worker watching its parent kept all three alive
    (issue 23, item 8: a search worker on PostgreSQL runs Optuna's heartbeat thread, which
    sends preprocessing to forkserver)."""
    while not processes.is_gone(owner):
        time.sleep(interval)
    os._exit(1)


def _process_one(task: tuple[int, str, str]) -> tuple[int, dict]:
    index, rel_path, out_rel = task
    try:
        raw = Path(_worker["source"], rel_path).read_bytes()
    except OSError as error:  # a broken or looping symlink, a file removed meanwhile
        return index, {"error": f"cannot read the file ({error.strerror})"}
    record = {"sha256": images.sha256(raw), "bytes": len(raw)}
    try:
        rgb = images.decode_image(raw, _worker["max_pixels"])
    except images.UnreadableImage as error:
        record["error"] = str(error)
        return index, record
    stored, gray = preprocess_planes(rgb, _worker["seg"])
    record.update(
        height=rgb.shape[0],
        width=rgb.shape[1],
        dhash=images.dhash(gray),
        mean_rgb=list(cv2.mean(rgb)[:3]),
    )
    png = images.encode_png(stored)
    with open(os.path.join(_worker["target"], out_rel), "wb") as handle:
        handle.write(png)
    return index, record


def _run_all(
    tasks, source_root, target_root, seg, max_pixels, workers, progress, side_job=None, fork_ok=True
):
    """Process every task on ``workers`` processes; ``side_job`` (a function and its arguments)
    runs on the same pool meanwhile, so that its cost hides behind the per-image work."""
    results: list[dict | None] = [None] * len(tasks)
    initargs = (str(source_root), str(target_root), seg, max_pixels, processes.token())
    method = _start_method(fork_ok) if workers > 1 else None
    tqdm.monitor_interval = 0  # tqdm's documented switch: no monitor thread, fork stays safe
    if method == "fork":
        # OpenCV's thread pool, started by any earlier OpenCV call in this process (a preview, a
        # stain reference, synthetic images), is copied into a forked worker without its
        # threads, and the worker's cv2.setNumThreads then waits on them forever. Stopping the
        # pool here, in the process that owns its threads, makes the fork safe.
        cv2.setNumThreads(1)
    bar = tqdm(
        total=len(tasks),
        unit="img",
        desc="preprocess",
        disable=None if progress else True,
        file=sys.stderr,
        mininterval=0.5,
    )
    if method is None:
        _init_worker(*initargs)
        for task in tasks:
            index, record = _process_one(task)
            results[index] = record
            bar.update()
        if side_job is not None:
            side_job[0](*side_job[1:])
    else:
        # Large chunks keep the parent idle; 4 per worker still balance the load.
        chunksize = max(1, min(256, len(tasks) // (workers * 4)))
        # An executor, not a Pool: a worker that dies raises BrokenProcessPool instead of
        # being replaced forever.
        with ProcessPoolExecutor(
            workers,
            multiprocessing.get_context(method),
            initializer=_init_worker,
            initargs=initargs,
        ) as pool:
            pending = pool.submit(*side_job) if side_job else None
            for index, record in pool.map(_process_one, tasks, chunksize=chunksize):
                results[index] = record
                bar.update()
            if pending is not None:
                pending.result()
    bar.close()
    return results


def _start_method(fork_ok: bool = True) -> str | None:
    """How to start workers, or None to work in this process.

    ``fork`` (workers start in milliseconds) only while this process has a single thread:
    forking a threaded process (after importing torch or MLflow) can copy a held lock and hang
    a worker; ``fork_ok=False`` when this process has just run OpenCV on its own thread pool,
    which ``threading`` does not count (a forked worker then hung in ``cv2.setNumThreads``).
    Otherwise ``forkserver``, whose workers re-import the main module, which fails when that is
    not a file (``python -`` reading stdin): then None.
    """
    methods = multiprocessing.get_all_start_methods()
    if fork_ok and "fork" in methods and threading.active_count() == 1:
        return "fork"
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.isfile(main_file):
        return None
    return "forkserver" if "forkserver" in methods else "spawn"


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# The step


def preprocess(
    data_dir,
    out_dir,
    seg: SegmentationParams = SegmentationParams(),
    split: SplitParams | None = None,
    manifest: str | os.PathLike | None = None,
    max_unreadable: float = MAX_UNREADABLE,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    workers: int = 0,
    progress: bool = True,
    preview_per_class: int = 3,
) -> PreprocessResult:
    """Audit, split and preprocess the dataset in ``data_dir`` into ``out_dir`` (cached)."""
    split = split or SplitParams()
    if not 0 <= max_unreadable <= 1:
        raise ValueError(f"max_unreadable must be a fraction in [0, 1], got {max_unreadable}")
    root, folders = data.resolve_root(data_dir)
    _check_not_nested(data_dir, root, out_dir)
    files, ignored = data.list_images(root, folders)
    manifest_rows, manifest_sha = None, None
    if manifest is not None:
        manifest_rows = data.read_manifest(manifest)
        manifest_sha = hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
        files = _files_in_manifest(files, manifest_rows, root)
    key = cache_key(files, seg, split, max_pixels, manifest_sha)
    store = OutputStore(out_dir, OWNER_MARK).open()
    found = store.find(key, _recorded_key)
    if found is not None:
        store.point_latest(found)
        cached = _read_params(found)
        return PreprocessResult(found, True, cached, cached.get("counts", {}))
    store.remove_stale_temporaries()

    tmp = store.new_temporary()
    try:
        taken: set[str] = set()
        outputs = [output_name(f.path, taken) for f in files]
        for folder in sorted({str(Path(o).parent) for o in outputs}):
            (tmp / folder).mkdir(parents=True, exist_ok=True)
        tasks = [(i, f.path, outputs[i]) for i, f in enumerate(files)]
        # Stain normalisation needs the training split, which needs every image's hash: a
        # first pass without it (hashes as every arm computes them, so the split is theirs),
        # then the reference fitted on training images and a second pass that writes them.
        first = replace(seg, stain_norm="none") if seg.stain_norm != "none" else seg
        preview = (write_preview, tmp / "preview.png", root, files, first, preview_per_class)
        run = (root, tmp, first, max_pixels, workers or default_workers(), progress)
        records = _run_all(tasks, *run, side_job=preview)
        rows, audit = rows_and_audit(
            files, outputs, records, ignored, split, manifest_rows, max_unreadable, root, folders
        )
        if first is not seg:
            seg = replace(seg, stain_reference=_fit_stain_reference(root, rows, seg, max_pixels))
            readable = {r["path"] for r in rows}
            # The fit ran OpenCV here: no fork now (see _start_method).
            selected = [t for t in tasks if t[1] in readable]
            _run_all(selected, root, tmp, seg, *run[3:], fork_ok=False)
        (tmp / "manifest.csv").write_bytes(data.manifest_bytes(rows))
        (tmp / "audit.json").write_text(json.dumps(audit, indent=2, sort_keys=True) + "\n")
        params = {
            "written_by": OWNER_MARK,
            "cache_key": key,
            "pipeline_version": PIPELINE_VERSION,
            "dataset_root": str(root.resolve()),
            "source_manifest": str(manifest) if manifest is not None else None,
            "segmentation": seg.to_dict(),
            "split": asdict(split),
            "limits": {"max_pixels": max_pixels, "max_unreadable": max_unreadable},
            "counts": audit["counts"],
        }
        # params.json last: the cache key is only ever next to a complete output.
        (tmp / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        final, _ = store.publish(tmp, key, _recorded_key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        store.release_if_unused()
    store.point_latest(final)
    params = _read_params(final)
    return PreprocessResult(final, False, params, params["counts"])


STAIN_FIT_IMAGES = 256  # training images the stain reference is fitted on, at most


def _fit_stain_reference(root: Path, rows, seg: SegmentationParams, max_pixels: int) -> tuple:
    """Reinhard's reference (``segmentation.fit_stain_reference``) from the training split
    only, resized as the model sees them: up to ``STAIN_FIT_IMAGES`` of them, evenly spaced in
    manifest order."""
    train = [r for r in rows if r["split"] == "train"]
    spaced = np.linspace(0, len(train) - 1, min(len(train), STAIN_FIT_IMAGES)).astype(int)
    chosen = [train[i] for i in sorted(set(spaced))]
    resized = [
        resize(images.decode_image((root / r["path"]).read_bytes(), max_pixels), seg.image_size)
        for r in chosen
    ]
    return fit_stain_reference(resized)


def _check_not_nested(data_dir, root: Path, out_dir) -> None:
    """An output inside the dataset would be read back as images of a class; a dataset inside
    an output could be mistaken for ours."""
    out = Path(out_dir).resolve()
    for source in {Path(data_dir).resolve(), root.resolve()}:
        if out == source or source in out.parents:
            raise data.DatasetError(
                f"--out-dir {str(out_dir)!r} is inside the dataset {str(source)!r}; choose an "
                "output folder outside it"
            )
        if out in source.parents:
            raise data.DatasetError(
                f"the dataset {str(source)!r} is inside --out-dir {str(out_dir)!r}; choose an "
                "output folder that does not contain it"
            )


def _files_in_manifest(files, rows, root) -> list[data.ImageFile]:
    by_path = {f.path: f for f in files}
    missing = [r["path"] for r in rows if r["path"] not in by_path]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise data.DatasetError(
            f"the manifest names {len(missing)} file(s) not found under {str(root)!r}: {shown}"
        )
    wrong = [r["path"] for r in rows if by_path[r["path"]].class_name != r["class"]]
    if wrong:
        raise data.DatasetError(
            f"the manifest's class disagrees with the folder for {len(wrong)} file(s), "
            f"e.g. {wrong[0]!r}"
        )
    return [by_path[p] for p in sorted({r["path"] for r in rows})]


def open_output(folder: str | os.PathLike) -> PreprocessResult:
    """A complete output folder this module wrote, as ``preprocess`` returns it on a cache hit;
    ``ValueError`` naming the folder when it is not one."""
    folder = Path(folder)
    params = _read_params(folder)
    if params is None or not (folder / "manifest.csv").is_file():
        raise ValueError(
            f"{str(folder)!r} is not a preprocessed folder (no params.json and manifest.csv of "
            "leukemia preprocess); expected a folder of the output store, e.g. processed/<key>"
        )
    return PreprocessResult(folder, True, params, params.get("counts", {}))


def stored_options(out_dir: str | os.PathLike, part: str = "segmentation") -> dict:
    """The options a preprocess output folder was made with (its ``params.json``), ``part``
    ``segmentation`` or ``split``; ``ValueError`` when the folder is not one."""
    params = _read_params(Path(out_dir))
    if not params or not isinstance(params.get(part), dict):
        raise ValueError(f"{str(out_dir)!r} is not a preprocess output (no params.json of ours)")
    return params[part]


def _read_params(out_dir: Path) -> dict | None:
    try:
        params = json.loads((out_dir / "params.json").read_text())
    except (OSError, ValueError):
        return None
    return params if isinstance(params, dict) and params.get("written_by") == OWNER_MARK else None


def _recorded_key(folder: Path) -> str | None:
    params = _read_params(folder)
    return params.get("cache_key") if params else None
