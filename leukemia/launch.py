"""One child training run: ``mlflow run <project> -e train -P ...`` started in the background,
and the ending of a run whose process did not end it (what every executor shares: ``children``
runs them in slots here, ``slurm`` as cluster jobs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from . import processes

_ENDED = ("FINISHED", "FAILED", "KILLED")


class ChildFailed(RuntimeError):
    """A child run failed or was cancelled; the message names it and its last error line."""


@dataclass(frozen=True)
class Child:
    label: str  # "baseline seed 1": who it is, in messages
    parameters: dict  # the train entry point's -P parameters


def launch(project: Path, child: Child, experiment_id: str, env_manager: str):
    """``mlflow run -e train`` started in the background: a ``LocalSubmittedRun``."""
    if env_manager == "local":
        # The child's `leukemia` command must be this interpreter's, even when its virtual
        # environment was not activated (mlflow runs the entry point through the shell).
        bin_dir = str(Path(sys.executable).parent)
        if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return mlflow.projects.run(
        str(project),
        entry_point="train",
        parameters={k: str(v) for k, v in child.parameters.items()},
        env_manager=env_manager,  # a child does not inherit the parent's --env-manager
        experiment_id=experiment_id,
        synchronous=False,
    )


def settle(proc: subprocess.Popen, wait: float = 30.0) -> None:
    """Give an interrupted child ``wait`` seconds to end its run, then kill it."""
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        processes.interrupt_tree(proc.pid, signal.SIGKILL)
        proc.wait()


def end_run(client: MlflowClient, run_id: str, status: str, over: tuple[str, ...] = ()) -> None:
    """End ``run_id`` as ``status`` unless its process already ended it (as anything but one of
    ``over``)."""
    if client.get_run(run_id).info.status not in set(_ENDED) - set(over):
        client.set_terminated(run_id, status)
