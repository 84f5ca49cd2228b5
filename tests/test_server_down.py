"""A tracking server that goes away mid-training: said at once, one line after a bounded retry
budget, the training state intact, and resume finishes the run once the server is back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .conftest import REPO, free_port, wait_healthy

BIN = Path(sys.executable).parent


def _server(tmp_path: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            BIN / "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
            "--workers",  # one starts faster on 2 cores than the default 4
            "1",
        ],
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_healthy(server, f"http://127.0.0.1:{port}/health", 90, "mlflow server")
    return server


def _stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


@pytest.mark.slow
def test_server_down_mid_training_then_resume(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "LEUKEMIA_CACHE_DIR": str(tmp_path / "cache"),
        "TQDM_DISABLE": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # A shorter retry budget than the default (about 30 s): the same path, sooner.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    train = [
        BIN / "leukemia",
        "train",
        "--config",
        REPO / "experiments" / "demo.yaml",
        "--synthetic-per-class",
        "8",
        # Enough epochs to be mid-training when the server stops (it stops as soon as the
        # first epoch is saved, and logging then blocks), few enough that the resume is quick:
        # one phase (the resume's path does not depend on which).
        "--phase1_epochs",
        "6",
        "--phase2_epochs",
        "0",
        "--patience",
        "6",
    ]
    server = _server(tmp_path, port)
    try:
        process = subprocess.Popen(
            train,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        states = tmp_path / "cache" / "runs"
        deadline = time.monotonic() + 120
        while not list(states.glob("*/state.pt")):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "no epoch finished within 120 s"
            time.sleep(0.1)
        _stop(server)
        down = time.monotonic()
        output, _ = process.communicate(timeout=180)
        seconds = time.monotonic() - down
    finally:
        _stop(server)
    assert process.returncode == 1, output
    assert "Traceback" not in output, output[-3000:]
    (state,) = states.glob("*/state.pt")
    run_id = state.parent.name
    assert "is unreachable; retrying" in output
    (error,) = [line for line in output.splitlines() if line.startswith("Error:")]
    assert "unreachable" in error and f"--resume {run_id}" in error
    assert seconds < 60, f"gave up only after {seconds:.0f} s"

    server = _server(tmp_path, port)
    try:
        resumed = subprocess.run(
            [*train, "--resume", run_id],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        import mlflow

        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        try:
            assert mlflow.get_run(run_id).info.status == "FINISHED"
        finally:
            mlflow.set_tracking_uri(None)
    finally:
        _stop(server)


class _Unavailable(BaseHTTPRequestHandler):
    """A tracking server whose database is down: HTTP 503 to every request, as MLflow's
    server answers then."""

    def _answer(self):
        body = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "database is down"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args):
        pass


def test_a_server_answering_503_is_unreachable_in_one_line(tmp_path, monkeypatch):
    """Issue 23, item 11: PostgreSQL down behind the tracking server made it answer 503, which
    was not taken as unreachable: three chained tracebacks; and with no run yet the line read
    'is unreachable when it is back'."""
    from click.testing import CliRunner

    from leukemia.cli import main

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("LEUKEMIA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    train = ["train", "--config", REPO / "experiments" / "demo.yaml", "--synthetic-per-class", 8]
    import mlflow

    mlflow.set_tracking_uri(uri)  # an earlier test's explicit URI would win over the variable
    try:
        for command in (["models"], train):
            result = CliRunner().invoke(main, [str(a) for a in command])
            assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
            assert result.output.splitlines()[-1] == (
                f"Error: MLflow tracking server {uri} is unreachable; try again when it is back"
            )
    finally:
        mlflow.set_tracking_uri(None)
        server.shutdown()
