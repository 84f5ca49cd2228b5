"""Where a study's children run: in slots on this machine, or as Slurm jobs (submitit).

A child is ``mlflow run <project> -e train -P ...``: a child run of the study's parent run.
``run_children`` starts every child through one executor and returns each one's finished run id,
in the order given, whatever order they end in:

- ``local``: ``jobs`` children at once on this machine (default one on a CPU, one per visible
  GPU on CUDA, each child pinned to its GPU with ``CUDA_VISIBLE_DEVICES``).
- ``slurm``: one job array through submitit; each job runs the same ``mlflow run`` on its node
  and tags its run with the job id and log paths. Every node must see the data, the processed
  folders, the tracking store and its artifacts (a shared file system, or the team server).

A child that fails ends its run FAILED and the study with its last error line. Local children
already running finish and no new one starts; Slurm jobs already submitted go on (a rerun reuses
what finished). Ctrl-C or ``kill`` of the parent cancels what is running or queued and ends
those runs KILLED.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from . import processes

EXECUTORS = ("local", "slurm")
JOB_TAG = "slurm.job_id"
LOG_TAG = "slurm.log"
_ENDED = ("FINISHED", "FAILED", "KILLED")
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


class ChildFailed(RuntimeError):
    """A child run failed or was cancelled; the message names it and its last error line."""


@dataclass(frozen=True)
class Child:
    label: str  # "baseline seed 1": who it is, in messages
    parameters: dict  # the train entry point's -P parameters


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
        return _run_slurm(
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


def _launch(project: Path, child: Child, experiment_id: str, env_manager: str):
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
                    submitted = _launch(project, child, experiment_id, env_manager)
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
                _end(client, submitted.run_id, "FAILED")
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
            _settle(submitted.command_proc)
            _end(client, submitted.run_id, "KILLED")
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


def _settle(proc: subprocess.Popen, wait: float = 30.0) -> None:
    """Give an interrupted child ``wait`` seconds to end its run, then kill it."""
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        processes.interrupt_tree(proc.pid, signal.SIGKILL)
        proc.wait()


def _end(client: MlflowClient, run_id: str, status: str) -> None:
    """End ``run_id`` as ``status`` unless its process already ended it."""
    if client.get_run(run_id).info.status not in _ENDED:
        client.set_terminated(run_id, status)


# ----------------------------------------------------------------------------- Slurm


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
    submitted = _launch(Path(project), Child("job", parameters), experiment_id, env_manager)
    client = MlflowClient()
    client.set_tag(submitted.run_id, "mlflow.parentRunId", parent_id)
    client.set_tag(submitted.run_id, JOB_TAG, job.job_id)
    client.set_tag(submitted.run_id, LOG_TAG, str(job.paths.stdout))
    # scancel sends SIGTERM to every process of the job: the child ends its run KILLED; if it
    # could not (the signal landed where Python ignores it), this process does.
    cancelled = []
    signal.signal(signal.SIGTERM, lambda *_: cancelled.append(True))
    if not submitted.wait():
        _end(client, submitted.run_id, "KILLED" if cancelled else "FAILED")
        why = "was cancelled" if cancelled else "failed"
        raise ChildFailed(f"the train run {submitted.run_id} {why} on {job.hostname}")
    return submitted.run_id


def _run_slurm(children, project, experiment_id, parent_id, env_manager, settings, log_dir, echo):
    uri = mlflow.get_tracking_uri()
    calls = [
        (train_job, str(project), c.parameters, env_manager, experiment_id, parent_id, uri)
        for c in children
    ]
    client = MlflowClient()

    def ended(job, status: str) -> None:
        run_id = _job_run(client, experiment_id, job.job_id)
        if run_id:
            _end(client, run_id, status)

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
    labels = [f"worker {i + 1}" for i in range(count)]
    if executor == "slurm":
        calls = [(command_job, argv)] * count
        run_array(calls, labels, slurm or Slurm(), log_dir, "leukemia-search", _nothing, echo)
        return
    started = [subprocess.Popen([sys.executable, "-m", "leukemia", *argv]) for _ in range(count)]
    try:
        codes = [p.wait() for p in started]
    except BaseException:
        for proc in started:
            processes.interrupt_tree(proc.pid)
        for proc in started:
            _settle(proc)
        raise
    failed = [f"{label} (exit code {code})" for label, code in zip(labels, codes) if code]
    if failed:
        raise ChildFailed(f"search workers failed: {', '.join(failed)}")


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
                states[f"{fields['ArrayJobId']}_{fields.get('ArrayTaskId', '')}"] = state
    return states


def _job_run(client: MlflowClient, experiment_id: str, job_id: str) -> str | None:
    runs = client.search_runs([experiment_id], f"tags.`{JOB_TAG}` = '{job_id}'")
    return runs[0].info.run_id if runs else None


def _job_failure(label: str, job, how: str, error: Exception | None) -> ChildFailed:
    """The job's last error line, and where its whole log is."""
    lines = [x.strip() for x in (job.stderr() or "").splitlines() if x.strip()]
    last = lines[-1] if lines else (str(error or "no output").strip().splitlines() or [""])[-1]
    return ChildFailed(
        f"{label}: Slurm job {job.job_id} ended {how}: {last} (log {job.paths.stderr})"
    )
