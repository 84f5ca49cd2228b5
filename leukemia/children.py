"""Where a study's children run: in slots on this machine, or as Slurm jobs (submitit).

A child is ``mlflow run <project> -e train -P ...`` (``launch``): a child run of the study's
parent run.
``run_children`` starts every child through one executor and returns each one's finished run id,
in the order given, whatever order they end in:

- ``local``: ``jobs`` children at once on this machine (default one on a CPU, one per visible
  GPU on CUDA, each child pinned to its GPU with ``CUDA_VISIBLE_DEVICES``).
- ``slurm``: one job array through submitit (``slurm``): each job runs the same ``mlflow run``
  on its node. Every node must see the data, the processed folders, the tracking store and
  its artifacts (a shared file system, or the team server).

A child that fails ends its run FAILED and the study with its last error line. Local children
already running finish and no new one starts; Slurm jobs already submitted go on (a rerun reuses
what finished). Ctrl-C or ``kill`` of the parent cancels what is running or queued and ends
those runs KILLED.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from . import processes
from .launch import Child, ChildFailed, end_run, launch, settle
from .slurm import Slurm, run_train_jobs, run_worker_jobs

EXECUTORS = ("local", "slurm")


def default_jobs() -> int:
    """One child at a time on a CPU; one per visible GPU on CUDA."""
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def run_children(
    children: list[Child],
    *,
    project: Path,
    experiment_id: str,
    parent_id: str,
    env_manager: str,
    executor: str = "local",
    jobs: int | None = None,
    slurm: Slurm | None = None,
    log_dir: Path | None = None,
    echo=print,
) -> list[str]:
    """Run ``children`` (see the module); their finished run ids, in order. Raises
    ``ChildFailed`` for the first that failed, once the others are settled."""
    if executor == "local":
        return _run_local(
            children, project, experiment_id, parent_id, env_manager, jobs or default_jobs(), echo
        )
    if executor == "slurm":
        return run_train_jobs(
            children,
            project,
            experiment_id,
            parent_id,
            env_manager,
            slurm or Slurm(),
            Path(log_dir or "slurm-logs"),
            echo,
        )
    raise ValueError(f"unknown executor {executor!r}; expected one of {', '.join(EXECUTORS)}")


def _run_local(children, project, experiment_id, parent_id, env_manager, jobs, echo):
    client = MlflowClient()

    def _failed(error: ChildFailed) -> ChildFailed:
        echo(f"{error}; the runs already started finish, no other starts")
        return error

    gpus = _visible_gpus() if jobs > 1 else []
    waiting = list(enumerate(children))
    running: dict[int, tuple] = {}  # index -> (submitted run, its slot)
    done: dict[int, str] = {}
    failure = None
    try:
        while waiting or running:
            free = [s for s in range(jobs) if s not in {slot for _, slot in running.values()}]
            while waiting and free and failure is None:
                index, child = waiting.pop(0)
                slot = free.pop(0)
                with _pinned(gpus[slot % len(gpus)] if gpus else None):
                    submitted = launch(project, child, experiment_id, env_manager)
                client.set_tag(submitted.run_id, "mlflow.parentRunId", parent_id)
                running[index] = (submitted, slot)
                where = f" (slot {slot + 1} of {jobs})" if jobs > 1 else ""
                echo(f"{child.label}: mlflow run -e train ... run {submitted.run_id}{where}")
            if failure is not None:
                waiting.clear()
            for index, (submitted, _) in list(running.items()):
                code = submitted.command_proc.poll()
                if code is None:
                    continue
                del running[index]
                if code == 0:
                    done[index] = submitted.run_id
                    continue
                end_run(client, submitted.run_id, "FAILED")
                failure = failure or _failed(
                    ChildFailed(
                        f"{children[index].label} failed (run {submitted.run_id}, exit code {code})"
                    )
                )
            time.sleep(0.2)
    except BaseException:
        for submitted, _ in running.values():
            processes.interrupt_tree(submitted.command_proc.pid)
        for submitted, _ in running.values():
            settle(submitted.command_proc)
            # `mlflow run` ends an interrupted run FAILED (its KeyboardInterrupt path) when the
            # child had not ended it yet: it was stopped, not broken, and can be resumed.
            end_run(client, submitted.run_id, "KILLED", over=("FAILED",))
        raise
    if failure is not None:
        raise failure
    return [done[i] for i in range(len(children))]


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]
    return [i.strip() for i in ids if i.strip()]


class _pinned:
    """``CUDA_VISIBLE_DEVICES=gpu`` for the child started within (None: unchanged)."""

    def __init__(self, gpu: str | None):
        self.gpu = gpu

    def __enter__(self):
        self.before = os.environ.get("CUDA_VISIBLE_DEVICES")
        if self.gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.gpu

    def __exit__(self, *exc):
        if self.gpu is None:
            return
        if self.before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.before


def run_workers(
    argv: list[str],
    count: int,
    *,
    executor: str,
    slurm: Slurm | None = None,
    log_dir: Path = Path("slurm-logs"),
    echo=print,
) -> None:
    """``count`` copies of ``leukemia <argv>`` at once (search workers sharing one study), as
    processes here or a Slurm job array; raises ``ChildFailed`` for the first that failed."""
    if executor == "slurm":
        run_worker_jobs(argv, count, slurm or Slurm(), log_dir, echo)
        return
    labels = [f"worker {i + 1}" for i in range(count)]
    started = [subprocess.Popen([sys.executable, "-m", "leukemia", *argv]) for _ in range(count)]
    try:
        codes = [p.wait() for p in started]
    except BaseException:
        for proc in started:
            processes.interrupt_tree(proc.pid)
        for proc in started:
            settle(proc)
        raise
    failed = [f"{label} (exit code {code})" for label, code in zip(labels, codes) if code]
    if failed:
        raise ChildFailed(f"search workers failed: {', '.join(failed)}")
