"""Wall time of one study under each executor (prints figures; not a test): issue 20.

    python benchmarks/executors.py [--runs local:1,local:2,slurm:1,slurm:2] [-- compare options]

Runs ``leukemia compare`` (the demo study unless options after ``--`` say otherwise:
``--config experiments/demo.yaml --shortcuts false``) once per ``executor:jobs`` pair, one after
another, each in a fresh temporary folder with its own SQLite store, and prints each one's wall
time and its children's test accuracy, so that the runs can be checked to be the same. A
``slurm`` pair needs ``sbatch`` on PATH (a login node, or ``SLURM_CONF`` for a test cluster).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--config", str(REPO / "experiments" / "demo.yaml"), "--shortcuts", "false"]


def study(executor: str, jobs: int, options: list[str]) -> tuple[float, dict[str, float]]:
    """One compare: its wall seconds and {arm seed: test accuracy}."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix=f"bench-{executor}-{jobs}-") as folder:
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "LEUKEMIA_CACHE_DIR": f"{folder}/cache"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        command = [sys.executable, "-m", "leukemia", "compare", *options]
        command += ["--executor", executor, "--jobs", str(jobs), "--experiment", "bench"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{executor}:{jobs} failed:\n{(done.stdout + done.stderr)[-2000:]}")
        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(
            experiment_names=["bench"], filter_string="tags.step = 'train'", output_format="list"
        )
        accuracy = {
            f"{r.data.tags['arm']} seed {r.data.params['config.seed']}": r.data.metrics[
                "test_accuracy"
            ]
            for r in runs
        }
        return seconds, dict(sorted(accuracy.items()))


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="local:1,local:2,slurm:1,slurm:2")
    args = parser.parse_args(argv)
    pairs = [(p.split(":")[0], int(p.split(":")[1])) for p in args.runs.split(",")]
    options = [*DEMO, *extra]
    print(f"leukemia compare {' '.join(options)}; {os.cpu_count()} CPUs")
    for executor, jobs in pairs:
        seconds, accuracy = study(executor, jobs, options)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items())
        print(f"{executor} --jobs {jobs}: {seconds:.0f} s; test accuracy {shown}", flush=True)


if __name__ == "__main__":
    main()
