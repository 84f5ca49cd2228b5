"""What a user sees of a study in the MLflow UI, in a real browser: a real ``mlflow ui`` on a
real study's store, driven by the system's headless Chromium through Playwright (which drives
that executable; nothing is downloaded). Skips where Chromium or Playwright is not installed
(``apt-get install chromium``; Playwright is in the test extra)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, free_port, mlflow_run_env, wait_healthy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM, reason="no Chromium here (apt-get install chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed"),
]
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
# Images of one key loaded and drawn at a readable size, the longer side at least 100 px with
# the assistant panel open beside them (not the "No image logged at this step" placeholder,
# not a sliver under a block of text).
DRAWN = (
    "([key, n]) => Array.from(document.images).filter(i => decodeURIComponent(i.src)"
    ".includes('images/' + key + '+') && i.complete && i.naturalWidth > 0"
    " && Math.max(i.getBoundingClientRect().width, i.getBoundingClientRect().height) >= 100)"
    ".length >= n"
)


def _ui(env: dict, port: int, cwd: Path) -> subprocess.Popen:
    ui = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "ui", "--backend-store-uri"]
        + [env["MLFLOW_TRACKING_URI"], "--port", str(port), "--workers", "1"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_healthy(ui, f"http://127.0.0.1:{port}/health", 180, "mlflow ui")
    return ui


def test_a_study_reads_in_the_mlflow_ui(tmp_path):
    env = mlflow_run_env(tmp_path)
    study = subprocess.run(
        [sys.executable, "-m", "leukemia", "compare"]
        + ["--config", REPO / "experiments" / "demo.yaml", "--synthetic-per-class", "8"]
        + ["--phase1_epochs", "1", "--phase2_epochs", "1"]
        + ["--seeds", "1", "--shortcuts", "false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert study.returncode == 0, (study.stdout + study.stderr)[-3000:]
    port = free_port()
    names = ("the answer (description)", "curves, one per arm", "images, run by run")
    links = {}
    for name in names:  # the links compare printed, for this server
        found = re.search(rf"^  {re.escape(name)}:\s+(http\S+)", study.stdout, re.M)
        assert found, f"no {name!r} link in: {study.stdout[-2000:]}"
        links[name] = found.group(1).replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    experiment = re.search(r"#/experiments/(\d+)/", links["images, run by run"]).group(1)
    ui = _ui(env, port, tmp_path)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1250})
            page.set_default_timeout(90_000)

            # The parent's description: the verdict first, then the table per arm.
            page.goto(links["the answer (description)"])
            page.get_by_text("proposed − baseline:").first.wait_for()
            body = page.inner_text("body")
            assert "no difference shown between proposed and baseline" in body
            assert re.search(r"baseline\s+0\.\d{3} ± 0\.000", body), body[:3000]

            # The saved view: the children grouped by arm, one curve per arm.
            page.goto(links["curves, one per arm"])
            page.get_by_text("Group: baseline").first.wait_for()
            page.get_by_text("Group: proposed").first.wait_for()
            page.get_by_text("val_loss").first.wait_for()

            # The images view, as it opens: each child's test confusion matrix and curves side
            # by side, and its first epoch's validation confusion matrix, drawn with no clicks
            # and without the run's parameters over them. A fresh browser, as a user opening
            # the link: the UI keeps a view's state per browser.
            page = browser.new_context(viewport={"width": 1500, "height": 1250}).new_page()
            page.set_default_timeout(90_000)
            page.goto(links["images, run by run"])
            page.get_by_text("matching runs").first.wait_for()
            page.wait_for_function(DRAWN, arg=["test_confusion", 2])
            page.wait_for_function(DRAWN, arg=["curves", 2])
            page.wait_for_function(DRAWN, arg=["val_confusion", 2])
            assert "config.model=" not in page.inner_text("body")

            # The Models tab lists each run's checkpoints and served model.
            page.goto(f"http://127.0.0.1:{port}/#/experiments/{experiment}/models")
            page.get_by_text("phase1-best").first.wait_for()
            body = page.inner_text("body")
            assert body.count("phase1-best") == 2 and body.count("phase2-best") == 2
            browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGKILL)
        ui.wait(timeout=30)
