"""The layout the README's architecture paragraph promises: pure libraries import no MLflow,
and no module grows past 400 lines."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

PURE = (
    "arms",
    "audit",
    "config",
    "data",
    "datasets",
    "engine",
    "evaluation",
    "figures",
    "gradcam",
    "guard",
    "images",
    "inference",
    "metrics",
    "model",
    "model_files",
    "preprocess",
    "preview",
    "processes",
    "search",
    "segmentation",
    "shortcut",
    "store",
    "synthetic",
    "train",
)


def test_pure_libraries_import_no_mlflow():
    """One interpreter imports them in turn and names the first that brings MLflow in."""
    code = (
        "import importlib, sys\n"
        f"for name in {PURE!r}:\n"
        "    importlib.import_module('leukemia.' + name)\n"
        "    if 'mlflow' in sys.modules:\n"
        "        print(name)\n"
        "        break\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"leukemia.{done.stdout.strip()} imports MLflow"


def test_no_module_above_400_lines():
    long = {
        str(path.relative_to(REPO)): n
        for path in (REPO / "leukemia").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert not long, long
