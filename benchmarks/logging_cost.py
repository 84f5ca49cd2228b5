"""What tracking costs a training run (prints figures; not a test): issue 21, item 7.

    python benchmarks/logging_cost.py [--config experiments/demo.yaml] [--synthetic-per-class 60]

Runs ``leukemia train`` (the demo's settings unless told otherwise) in this process, under
cProfile, on a fresh SQLite store and cache in a temporary folder, and splits the main thread's
time into tracking and the rest. Tracking is every call from the package's other modules into
``mlflow`` or into the modules that exist only to log (``tracking``, ``ui``, ``figures``):
parameters, metrics per epoch, confusion-matrix and curve images, checkpoints as logged models,
the model and its registration, datasets, descriptions. System metrics are sampled in a thread
of their own and are not in the figure. cProfile slows Python code more than the network's C
kernels, so the share it prints is an upper bound. The budget is 5% of a demo run.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time

LOGGING_MODULES = tuple(
    os.path.join("leukemia", name) for name in ("tracking.py", "ui.py", "figures.py")
)


def _is_logging(filename: str) -> bool:
    return f"{os.sep}mlflow{os.sep}" in filename or filename.endswith(LOGGING_MODULES)


def _is_package(filename: str) -> bool:
    return f"{os.sep}leukemia{os.sep}" in filename and not filename.endswith(LOGGING_MODULES)


def tracking_calls(stats: pstats.Stats) -> dict[str, float]:
    """Seconds spent in each tracking function, as called from the package's other modules."""
    spent: dict[str, float] = {}
    for (filename, line, name), (*_, callers) in stats.stats.items():
        if not _is_logging(filename):
            continue
        for (caller_file, *_), (_, _, _, cumulative) in callers.items():
            if _is_package(caller_file):
                where = filename.split(f"site-packages{os.sep}")[-1]
                key = f"{where}:{line} {name}"
                spent[key] = spent.get(key, 0.0) + cumulative
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/demo.yaml")
    parser.add_argument("--synthetic-per-class", type=int, default=60)
    parser.add_argument("--data-dir", default="synthetic")
    parser.add_argument("--top", type=int, default=8, help="tracking calls listed")
    args = parser.parse_args()

    from leukemia.cli import main as leukemia

    config = os.path.abspath(args.config)
    with tempfile.TemporaryDirectory(prefix="leukemia-logging-") as scratch:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
        os.environ["LEUKEMIA_CACHE_DIR"] = os.path.join(scratch, "cache")
        os.chdir(scratch)
        command = [
            "train", "--config", config, "--data-dir", args.data_dir,
            "--synthetic-per-class", str(args.synthetic_per_class),
        ]  # fmt: skip
        # Preprocessing first, outside the figure: it is cached and shared by every arm.
        leukemia(["preprocess", *command[1:]], standalone_mode=False)
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        leukemia(command, standalone_mode=False)
        profile.disable()
        total = time.perf_counter() - started
    spent = tracking_calls(pstats.Stats(profile))
    logging = sum(spent.values())
    print(f"\ntrain ({args.config}, {args.data_dir}): {total:.1f} s under cProfile")
    print(f"tracking: {logging:.1f} s ({100 * logging / total:.1f}% of the run)")
    for key, seconds in sorted(spent.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {seconds:7.2f} s  {key}")


if __name__ == "__main__":
    main()
