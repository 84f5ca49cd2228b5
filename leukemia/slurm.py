"""A study's children and search workers as Slurm jobs, through submitit: one job array per
study, the resources from the ``slurm:`` block of the experiment YAML or ``--slurm-*``.

Each train job runs the same ``mlflow run -e train`` on its node (``launch``) and tags its run
with the job id and log path (``record.SLURM_JOB``, ``record.SLURM_LOG``). Every node must see
the data, the processed folders, the tracking store and its artifacts (a shared file system, or
the team server). A job that fails ends its run FAILED and the study with its last error line;
the other jobs go on (a rerun reuses what finished). Ctrl-C or ``kill`` of the parent cancels
what is queued or running and ends those runs KILLED.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from . import record as rec
from .launch import Child, ChildFailed, end_run, launch

# States Slurm leaves a job in when it will never write a result (`scontrol show job`).
_SLURM_OVER = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}


@dataclass(frozen=True)
class Slurm:
    """One child's resources: the ``slurm:`` block of an experiment YAML, or ``--slurm-*``."""

    partition: str | None = None  # None: the cluster's default partition
    time_min: int = 120
    gpus: int = 0
    cpus: int = 2
    mem_gb: float | None = None  # None: the partition's default
    max_parallel: int = 0  # at most this many jobs of the array at once (0: no limit)

    @classmethod
    def from_block(cls, block: dict | None, where: str) -> Slurm:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(block or {}) - names)
        if unknown:
            raise ValueError(
                f"unknown keys {unknown} in the slurm block of {where}; expected some of "
                f"{sorted(names)}"
            )
        return cls(**(block or {}))

    # The command-line options that set a field (``--slurm-time`` is minutes).
    OPTIONS = {
        "slurm_partition": "partition",
        "slurm_time": "time_min",
        "slurm_gpus": "gpus",
        "slurm_cpus": "cpus",
        "slurm_mem_gb": "mem_gb",
    }

    @classmethod
    def from_options(cls, options: dict, config_path=None) -> Slurm:
        """The ``slurm:`` block of the experiment YAML at ``config_path`` with the ``--slurm-*``
        options given over it; takes those options out of ``options`` (click's keyword names).
        Raises ``ValueError`` naming a bad key or file."""
        from .config import slurm_block

        given = {field: options.pop(name, None) for name, field in cls.OPTIONS.items()}
        block = slurm_block(config_path) if config_path is not None else {}
        where = repr(str(config_path)) if config_path is not None else "the options"
        return cls.from_block({**block, **{k: v for k, v in given.items() if v is not None}}, where)


def check_slurm(settings: Slurm) -> None:
    """Bad settings are one clear line before any job is submitted."""
    if shutil.which("sbatch") is None:
        raise ValueError(
            "--executor slurm needs Slurm's sbatch on PATH (none found); run it on a login node "
            "of the cluster, or use --executor local"
        )
    if settings.partition:
        known = subprocess.run(
            ["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True, timeout=60
        ).stdout.split()
        if settings.partition not in known:
            raise ValueError(
                f"unknown Slurm partition {settings.partition!r}; this cluster has "
                f"{', '.join(sorted(set(known))) or 'none'}"
            )
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:") and not uri.startswith("sqlite:////"):
        raise ValueError(
            f"the tracking store {uri} is a relative path; jobs on other nodes need an absolute "
            "path on a shared file system (or the team server)"
        )


def train_job(
    project: str,
    parameters: dict,
    env_manager: str,
    experiment_id: str,
    parent_id: str,
    tracking_uri: str,
) -> str:
    """A Slurm job's body: ``mlflow run -e train`` on this node; its run id, or an error."""
    import submitit

    job = submitit.JobEnvironment()
    mlflow.set_tracking_uri(tracking_uri)
    submitted = launch(Path(project), Child("job", parameters), experiment_id, env_manager)
    client = MlflowClient()
    client.set_tag(submitted.run_id, "mlflow.parentRunId", parent_id)
    client.set_tag(submitted.run_id, rec.SLURM_JOB, job.job_id)
    client.set_tag(submitted.run_id, rec.SLURM_LOG, str(job.paths.stdout))
    # scancel sends SIGTERM to every process of the job: the child ends its run KILLED; if it
    # could not (the signal landed where Python ignores it), this process does.
    cancelled = []
    signal.signal(signal.SIGTERM, lambda *_: cancelled.append(True))
    if not submitted.wait():
        end_run(client, submitted.run_id, "KILLED" if cancelled else "FAILED")
        why = "was cancelled" if cancelled else "failed"
        raise ChildFailed(f"the train run {submitted.run_id} {why} on {job.hostname}")
    return submitted.run_id


def run_train_jobs(
    children, project, experiment_id, parent_id, env_manager, settings, log_dir, echo
):
    uri = mlflow.get_tracking_uri()
    calls = [
        (train_job, str(project), c.parameters, env_manager, experiment_id, parent_id, uri)
        for c in children
    ]
    client = MlflowClient()

    def ended(job, status: str) -> None:
        run_id = _job_run(client, experiment_id, job.job_id)
        if run_id:
            end_run(client, run_id, status)

    return run_array(
        calls, [c.label for c in children], settings, log_dir, "leukemia-train", ended, echo
    )


def run_array(calls, labels, settings: Slurm, log_dir: Path, name: str, ended, echo) -> list:
    """``calls`` (function, *args) as one Slurm job array through submitit; their results in
    order. ``ended(job, "FAILED" | "KILLED")`` settles what a job that did not finish left."""
    import submitit

    check_slurm(settings)
    executor = submitit.AutoExecutor(folder=str(Path(log_dir).resolve() / "%j"), cluster="slurm")
    executor.update_parameters(
        name=name,
        timeout_min=settings.time_min,
        gpus_per_node=settings.gpus,
        cpus_per_task=settings.cpus,
        slurm_partition=settings.partition,
        slurm_array_parallelism=settings.max_parallel or len(calls),
        **({"mem_gb": settings.mem_gb} if settings.mem_gb else {}),
    )
    with executor.batch():  # one job array
        jobs = [executor.submit(*call) for call in calls]
    for label, job in zip(labels, jobs):
        echo(f"{label}: Slurm job {job.job_id}, log {job.paths.stdout}")
    done: dict[int, object] = {}
    failure = None
    pending = set(range(len(jobs)))
    try:
        failed_at: dict[int, float] = {}
        while pending:
            time.sleep(2)
            states = _slurm_states()
            for index in sorted(pending):
                job = jobs[index]
                state = states.get(job.job_id)
                finished = job.paths.result_pickle.exists()
                if not finished and state not in _SLURM_OVER and state is not None:
                    continue  # queued or running
                error = None
                if finished:
                    try:
                        done[index] = job.result()
                        pending.discard(index)
                        continue
                    except Exception as raised:  # submitit re-raises the job's error
                        error = raised
                    # A job's error is written before Slurm says why it ended (scancel: the
                    # child stopped, then the job is CANCELLED): wait for the state a while.
                    first = failed_at.setdefault(index, time.monotonic())
                    if state not in _SLURM_OVER and time.monotonic() - first < 60:
                        continue
                pending.discard(index)
                cancelled = (state or "").startswith("CANCELLED")
                ended(job, "KILLED" if cancelled else "FAILED")
                how = "CANCELLED" if cancelled else "with an error" if error else state or "GONE"
                this = _job_failure(labels[index], job, how, error)
                echo(f"{this}; the other jobs go on")
                failure = failure or this
    except BaseException:
        # Ctrl-C or kill of the parent: nothing left queued or running.
        left = [jobs[index] for index in sorted(pending)]
        for job in left:
            job.cancel(check=False)
        echo(f"interrupted: cancelled Slurm jobs {', '.join(j.job_id for j in left)}")
        time.sleep(1)
        for job in left:
            ended(job, "KILLED")
        raise
    if failure is not None:
        raise failure
    return [done[i] for i in range(len(calls))]


def command_job(argv: list[str]) -> None:
    """A Slurm job's body: ``leukemia <argv>`` on this node."""
    done = subprocess.run([sys.executable, "-m", "leukemia", *argv])
    if done.returncode:
        raise ChildFailed(f"leukemia {argv[0]} exited with code {done.returncode}")


def run_worker_jobs(argv: list[str], count: int, settings: Slurm, log_dir: Path, echo) -> None:
    """``count`` copies of ``leukemia <argv>`` (search workers sharing one study) as one job
    array; raises ``ChildFailed`` for the first that failed."""
    labels = [f"worker {i + 1}" for i in range(count)]
    calls = [(command_job, argv)] * count
    run_array(calls, labels, settings, log_dir, "leukemia-search", _nothing, echo)


def _nothing(job, status: str) -> None:
    """A search worker's trials are settled by the study (Optuna's heartbeat, the report)."""


def _slurm_states() -> dict[str, str]:
    """Every job's state from ``scontrol`` (no accounting database needed), by job id and by
    ``<array>_<task>`` id as submitit names array tasks."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True, timeout=60
    )
    states = {}
    for line in shown.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        state = fields.get("JobState")
        if state:
            states[fields.get("JobId", "")] = state
            if "ArrayJobId" in fields:
                for task in _array_tasks(fields.get("ArrayTaskId", "")):
                    states[f"{fields['ArrayJobId']}_{task}"] = state
    return states


def _array_tasks(text: str) -> list[str]:
    """The task ids of ``scontrol``'s ``ArrayTaskId``: one (``3``), or, for the tasks still
    pending under a throttle, one record for a range (``2-3%2``, ``1,4-9:2``)."""
    tasks = []
    for part in text.split("%")[0].split(","):
        first, _, rest = part.partition("-")
        if not rest:
            tasks.append(first)
            continue
        last, _, step = rest.partition(":")
        try:
            tasks += [str(t) for t in range(int(first), int(last) + 1, int(step or 1))]
        except ValueError:
            tasks.append(part)  # not a range we know: kept as given
    return tasks


def _job_run(client: MlflowClient, experiment_id: str, job_id: str) -> str | None:
    runs = client.search_runs([experiment_id], f"tags.`{rec.SLURM_JOB}` = '{job_id}'")
    return runs[0].info.run_id if runs else None


def _job_failure(label: str, job, how: str, error: Exception | None) -> ChildFailed:
    """The job's last error line, and where its whole log is."""
    lines = [x.strip() for x in (job.stderr() or "").splitlines() if x.strip()]
    last = lines[-1] if lines else (str(error or "no output").strip().splitlines() or [""])[-1]
    return ChildFailed(
        f"{label}: Slurm job {job.job_id} ended {how}: {last} (log {job.paths.stderr})"
    )
