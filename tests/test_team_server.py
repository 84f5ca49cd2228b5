"""The team server's wiring, for real on this machine (docker/compose.yaml without Docker): a
throwaway PostgreSQL cluster with the databases ``mlflow`` and ``optuna``, each owned by its own
role; ``mlflow db upgrade``, then ``mlflow server`` on it with artifacts served through the
server from a local folder, and the compose file's ``--allowed-hosts``. Against it: the whole
train-register-promote path, workers opening an empty Optuna database at once, two search
workers on one study in PostgreSQL (one killed mid-trial), and a training run that outlives a
server restart.

Skipped only where PostgreSQL's binaries are absent (``.ci/run`` installs them with apt), or,
as root, where there is no ``postgres`` user to run them as.
Everything the module starts is stopped at its end, however it ends: the server's process
group, the workers, and the cluster (``pg_ctl stop -m immediate``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from leukemia import search as search_lib
from leukemia import tracking
from leukemia import train as training
from leukemia.steps import search as search_step

from . import pg
from .conftest import REPO
from .test_search import write_space

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DEMO = REPO / "experiments" / "demo.yaml"
TINY = ["--synthetic-per-class", "8", "--workers", "1"]
# docker/compose.yaml's: the service name for the containers, localhost for tunnels.
ALLOWED_HOSTS = "mlflow,mlflow:5000,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
PASSWORDS = {"mlflow": secrets.token_hex(12), "optuna": secrets.token_hex(12)}
# Object-store settings a client must not need: artifacts travel through the server.
CLIENT_DROPS = ("AWS_", "AZURE_", "GOOGLE_", "MLFLOW_", "PG")


def _kill_group(process: subprocess.Popen | None) -> None:
    """SIGKILL a process this module started in a session of its own, with its children."""
    if process is None or process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


class TrackingServer:
    """``mlflow server`` on the cluster's ``mlflow`` database, as compose starts it."""

    def __init__(self, cluster: pg.Cluster, folder: Path):
        self.cluster, self.folder = cluster, folder
        self.port = pg.free_port()
        self.artifacts = folder / "artifacts"
        self.log = folder / "server.log"
        self.process: subprocess.Popen | None = None
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))},
            "PGPASSWORD": PASSWORDS["mlflow"],  # as compose gives it: never in the URL
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def upgrade(self) -> None:
        """compose's ``mlflow-db-upgrade``: the schema, before the server starts."""
        done = subprocess.run(
            [BIN / "mlflow", "db", "upgrade", self.cluster.url("mlflow")],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    def start(self) -> TrackingServer:
        command = [
            BIN / "mlflow", "server",
            "--backend-store-uri", self.cluster.url("mlflow"),
            "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--allowed-hosts", ALLOWED_HOSTS,
        ]  # fmt: skip
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.folder,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not answer /health within 120 s: {self.log_tail()}")

    def stop(self) -> None:
        _kill_group(self.process)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@pytest.fixture(scope="module")
def postgres():
    reason = pg.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with pg.cluster(PASSWORDS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    try:
        import psycopg2  # noqa: F401 - the server's and the workers' driver
    except ImportError:
        pytest.fail("psycopg2 is missing: pip install -e '.[test]' installs psycopg2-binary")
    tracking_server = TrackingServer(postgres, tmp_path_factory.mktemp("team-server"))
    try:
        tracking_server.upgrade()
        yield tracking_server.start()
    finally:
        tracking_server.stop()


def client_env(server: TrackingServer, folder: Path, **extra) -> dict:
    """A laptop's environment: the server's URI, no store credentials, a private cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_DROPS)}
    return {
        **env,
        "MLFLOW_TRACKING_URI": server.uri,
        "LEUKEMIA_CACHE_DIR": str(folder / "cache"),
        "TQDM_DISABLE": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


def leukemia(env: dict, cwd: Path, *args) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [BIN / "leukemia", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"leukemia {args[0]}: {(done.stdout + done.stderr)[-3000:]}"
    return done


def test_the_api_answers_the_compose_service_name(server):
    """`Host: mlflow:5000` (what the containers send) reaches the API, not only /health; a
    name not allowed is refused, so the check is live."""

    def status(path: str, host: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{server.uri}{path}", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    for host in ("mlflow:5000", "mlflow", f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
        code, body = status(search, host)
        assert code == 200, (host, code, body[:300])
        assert "experiments" in json.loads(body)
    assert status(search, "attacker.example:5000")[0] == 403
    assert status(search, "mlflow:5001")[0] == 403  # only the compose port
    assert status("/health", "mlflow:5000")[0] == 200


def test_train_register_promote_through_the_server(server, tmp_path):
    """preprocess, train, evaluate, promote with only MLFLOW_TRACKING_URI: params, per-epoch
    metrics, artifacts under mlflow-artifacts:/ in the server's folder, the version and its
    @champion alias, all in PostgreSQL."""
    experiment, name = "team-workflow", "team-classifier"
    env = client_env(server, tmp_path)
    common = ["--experiment", experiment]
    leukemia(env, tmp_path, "preprocess", *TINY, "--image-size", "64", *common)
    leukemia(
        env, tmp_path, "train", "--config", DEMO, *TINY, "--phase1_epochs", "1",
        "--phase2_epochs", "2", "--registered-model-name", name, *common,
    )  # fmt: skip
    leukemia(
        env, tmp_path, "evaluate", "--model-uri", f"models:/{name}/1", "--bootstrap", "20",
        "--no-robustness", "--gradcam-per-class", "0", *common,
    )  # fmt: skip
    promoted = leukemia(env, tmp_path, "promote", "1", "--name", name, "--json")
    assert json.loads(promoted.stdout.splitlines()[-1])["promote"] is True

    client = server.client()
    found = client.get_experiment_by_name(experiment)
    assert found.artifact_location.startswith("mlflow-artifacts:/")
    runs = client.search_runs([found.experiment_id])
    steps = sorted(r.data.tags.get("step") for r in runs)
    assert steps == ["evaluate", "preprocess", "train"], steps
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in runs)
    (trained,) = [r for r in runs if r.data.tags["step"] == "train"]
    run_id = trained.info.run_id

    params = trained.data.params
    assert params["config.model"] == "test_efficientnet" and params["config.phase2_epochs"] == "2"
    assert params["preprocess.image_size"] == "64" and params["data.manifest_hash"]
    for metric in ("val_loss", "train_accuracy", "lr"):
        history = client.get_metric_history(run_id, metric)
        assert sorted(m.step for m in history) == [1, 2, 3], (metric, history)
    assert {"test_accuracy", "test_f1_macro"} <= set(trained.data.metrics)

    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"curves.png", "checkpoint", "evaluation"} <= top, top
    checkpoint = {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    assert {"checkpoint/weights.safetensors", "checkpoint/model.json"} <= checkpoint
    local = client.download_artifacts(run_id, "checkpoint/model.json", str(tmp_path))
    assert json.loads(Path(local).read_text())  # read back through the server
    stored = server.artifacts / found.experiment_id / run_id / "artifacts" / "checkpoint"
    assert (stored / "weights.safetensors").stat().st_size > 0  # the server wrote it, not us

    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.run_id == run_id
    assert "champion" in champion.aliases
    assert champion.source.startswith("models:/m-")  # a logged model, its files on the server
    logged = client.get_logged_model(champion.source.removeprefix("models:/"))
    assert logged.artifact_location.startswith("mlflow-artifacts:/")
    (evaluated,) = [r for r in runs if r.data.tags["step"] == "evaluate"]
    assert "test_accuracy" in evaluated.data.metrics
    assert client.list_artifacts(evaluated.info.run_id)


def test_workers_that_start_at_once_all_open_an_empty_optuna_database(postgres):
    """`--scale search-worker=4` on a fresh volume: four storages created at the same instant
    race to create Optuna's tables; every one of them opens (without the retry, three fail
    with a duplicate key in pg_type)."""
    postgres.psql("CREATE DATABASE optuna_race OWNER optuna")
    url = postgres.url("optuna", password=True).rsplit("/", 1)[0] + "/optuna_race"
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def open_at_once():
        barrier.wait()
        try:
            search_lib.open_storage(url)
            outcomes.append("opened")
        except ValueError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=open_at_once, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert outcomes == ["opened"] * 4, outcomes


GRACE_S = 3
# A search worker with a short heartbeat (the library's 60 s / 180 s would make this test wait
# minutes): everything else is `leukemia search` as the compose workers run it.
WORKER = (
    "import sys; from leukemia import search; "
    f"search.HEARTBEAT_INTERVAL_S, search.HEARTBEAT_GRACE_S = 1, {GRACE_S}; "
    "from leukemia.cli import main; main(['search', *sys.argv[1:]], prog_name='leukemia')"
)


def test_two_search_workers_share_a_study_in_postgresql(server, postgres, tmp_path):
    """Two workers on one study in the `optuna` database; one is SIGKILLed inside a trial.
    The other's heartbeat check fails that trial, ends its MLflow run, runs it again, and
    finishes the study: unique trial numbers, one child run per trial under one parent."""
    experiment, study_name = "team-search", "team"
    space = write_space(
        tmp_path / "space.yaml", {"phase2_lr": {"low": 1e-3, "high": 1e-2}}, pruner="none"
    )
    env = client_env(server, tmp_path, PGPASSWORD=PASSWORDS["optuna"])
    # Trials of 8 epochs (several seconds each) outlast the 3 s grace: after the kill, the
    # survivor starts a trial late enough to see the dead one's heartbeat stale before it
    # reaches --max-trials. No pruning, no early stopping: every trial runs every epoch.
    command = [
        sys.executable, "-c", WORKER, "--space", str(space), "--storage", postgres.url("optuna"),
        "--study-name", study_name, "--experiment", experiment, "--n-trials", "6",
        "--max-trials", "3", *TINY, "--phase1_epochs", "1", "--phase2_epochs", "7",
        "--patience", "0",
    ]  # fmt: skip
    storage = optuna.storages.RDBStorage(postgres.url("optuna", password=True))
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(2)]
    workers = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for log in logs
    ]
    victim, survivor = workers
    try:
        lost = _wait_until_inside_a_trial(storage, study_name, victim)
        time.sleep(1)  # an epoch or so into it
        assert victim.poll() is None, "the victim left its trial before it could be killed"
        # Hold the survivor until the victim's heartbeat is past the grace period, so that its
        # next trial start (not the end-of-study sweep) finds the dead trial, however fast the
        # survivor's own trials are.
        os.killpg(survivor.pid, signal.SIGSTOP)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        time.sleep(GRACE_S + 2)
        os.killpg(survivor.pid, signal.SIGCONT)
        assert survivor.wait(timeout=420) == 0, _tail(tmp_path / "worker1.log")
    finally:
        for worker in workers:
            _kill_group(worker)
        for log in logs:
            log.close()
    output = (tmp_path / "worker1.log").read_text()

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"], (states, output[-3000:])
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert failed.number == lost and f":{victim.pid}:" in failed.user_attrs["process"]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == lost]
    assert len(retries) == 1, output[-3000:]  # the heartbeat failed it, not a later sweep
    (retried,) = retries
    assert retried.state.name == "COMPLETE" and retried.params == failed.params
    assert f"trial {lost} lost its worker (no heartbeat)" in output

    client = server.client()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("step") == "search"]
    assert parent.info.status == "FINISHED" and "best_value" in parent.data.metrics
    assert parent.info.run_id == study.user_attrs[search_step.PARENT_ATTR]
    children = {
        r.info.run_id: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert len(runs) == 1 + len(trials)  # nothing outside the study's tree
    assert set(children) == {t.user_attrs[search_step.RUN_ATTR] for t in trials}
    dead = children[failed.user_attrs[search_step.RUN_ATTR]]
    assert dead.info.status == "KILLED"
    assert "heartbeats" in dead.data.tags[tracking.KILLED_TAG]  # ended when the study noticed
    for trial in trials:
        if trial.state.name == "COMPLETE":
            run_id = trial.user_attrs[search_step.RUN_ATTR]
            assert children[run_id].info.status == "FINISHED"
            steps = [m.step for m in client.get_metric_history(run_id, "val_f1_macro")]
            assert sorted(steps) == list(range(1, 9))  # 1 + 7 epochs, each once
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "trials.csv"} <= names


def _wait_until_inside_a_trial(storage, study_name: str, worker, timeout: float = 240) -> int:
    """The number of the trial ``worker`` is running, once its MLflow run exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"worker exited {worker.returncode} before any trial"
        try:
            running = optuna.load_study(study_name=study_name, storage=storage).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
            )
        except KeyError:  # no study yet
            running = []
        for trial in running:
            mine = f":{worker.pid}:" in trial.user_attrs.get("process", "")
            if mine and search_step.RUN_ATTR in trial.user_attrs:
                return trial.number
        time.sleep(0.2)
    pytest.fail(f"the worker started no trial within {timeout:.0f} s")


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def test_server_restart_mid_training_then_resume(server, tmp_path):
    """The server goes away while a run logs epochs: one clear line, the training state
    intact; back on the same port and database, resume finishes the run with every epoch
    logged once."""
    # A short retry budget (the library's default waits about 30 s): a variable set wins.
    env = client_env(
        server,
        tmp_path,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        MLFLOW_HTTP_REQUEST_TIMEOUT="10",
    )
    train = [
        BIN / "leukemia", "train", "--config", DEMO, *TINY, "--phase1_epochs", "6",
        "--phase2_epochs", "2", "--patience", "20", "--registered-model-name", "",
        "--experiment", "team-restart",
    ]  # fmt: skip
    states = tmp_path / "cache" / "runs"
    process = subprocess.Popen(
        train,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not list(states.glob("*/state.pt")):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "no epoch finished within 180 s"
            time.sleep(0.1)
        server.stop()
        output, _ = process.communicate(timeout=180)
    finally:
        _kill_group(process)
        if server.process.returncode is not None:
            server.start()  # same port, same database: the next test, and resume, need it
    assert process.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    (state_file,) = states.glob("*/state.pt")
    run_id = state_file.parent.name
    assert "is unreachable; retrying" in output
    (error,) = [line for line in output.splitlines() if line.startswith("Error:")]
    assert "unreachable" in error and f"--resume {run_id}" in error

    state = training.load_state(state_file.parent)  # whole, and readable as it was written
    saved = state["global_epoch"]
    assert 1 <= saved < 8 and [r["epoch"] for r in state["history"]] == list(range(1, saved + 1))
    assert not list(state_file.parent.glob(".state.pt.tmp-*"))
    client = server.client()
    before = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert before and max(before) <= saved + 1  # an epoch logged, then its save failed

    resumed = subprocess.run(
        [*train, "--resume", run_id], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=400, start_new_session=True,
    )  # fmt: skip
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    last = int(run.data.metrics["phase2_start_epoch"]) + 1  # phase 2 ran its 2 epochs
    for metric in ("val_loss", "train_loss", "epoch_seconds"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, metric))
        assert steps == list(range(1, last + 1)), (metric, steps)  # each epoch once
    assert "test_accuracy" in run.data.metrics


def test_the_optuna_database_going_down_mid_trial_is_one_line_and_nothing_stays_running(
    tmp_path,
):
    """Issue 23, item 11: PostgreSQL stopping under a search worker's trial was ten chained
    tracebacks (the heartbeat thread's among them) and left the search's parent run RUNNING.
    Now one line naming the storage (password hidden), the trial's and the parent's runs ended,
    and the trial left RUNNING in the storage for the next worker's heartbeat check to retry.
    Its own cluster: stopping the module's would take the tracking server down with it."""
    if pg.unavailable_reason():
        pytest.skip(pg.unavailable_reason())
    space = write_space(
        tmp_path / "space.yaml", {"phase2_lr": {"low": 1e-3, "high": 1e-2}}, pruner="none"
    )
    with pg.cluster({"optuna": PASSWORDS["optuna"]}) as cluster:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(CLIENT_DROPS)},
            "MLFLOW_TRACKING_URI": uri,
            "PGPASSWORD": PASSWORDS["optuna"],
            "LEUKEMIA_CACHE_DIR": str(tmp_path / "cache"),
        }
        command = [
            sys.executable, "-c", WORKER, "--space", str(space), "--storage",
            cluster.url("optuna"), "--study-name", "down", "--n-trials", "2", *TINY,
            "--phase1_epochs", "1", "--phase2_epochs", "30", "--patience", "0",
        ]  # fmt: skip
        storage = optuna.storages.RDBStorage(cluster.url("optuna", password=True))
        with (tmp_path / "worker.log").open("w") as log:
            worker = subprocess.Popen(
                command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                lost = _wait_until_inside_a_trial(storage, "down", worker)
                time.sleep(GRACE_S)  # heartbeats (1 s) and epochs under way
                storage.engine.dispose()
                cluster._run(
                    cluster.bin / "pg_ctl", "-D", cluster.data, "-m", "immediate", "-w", "stop"
                )
                assert worker.wait(timeout=120) != 0
            finally:
                _kill_group(worker)
    output = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in output and "Exception in thread" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output[-3000:]
    assert f"Optuna storage {cluster.url('optuna')} is unreachable (" in errors[0]
    assert PASSWORDS["optuna"] not in output
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    status = sorted((r.data.tags.get("step"), r.info.status) for r in runs)
    assert status == [("search", "FAILED"), ("search-trial", "FAILED")], (status, lost)
