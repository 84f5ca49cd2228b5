"""The layout the README's architecture paragraph promises: pure libraries import no MLflow,
and no two modules import each other, directly or through others (a cycle means two modules
share one concept, or one reaches back into another's)."""

from __future__ import annotations

import ast
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
    "record",
    "processes",
    "search",
    "segmentation",
    "shortcut",
    "split",
    "store",
    "synthetic",
    "train",
    "journal",
    "yamlfile",
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


def _imports(path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in it (at the top, under
    TYPE_CHECKING or inside a function: each is a dependency)."""
    name = ".".join(path.with_suffix("").relative_to(REPO).parts).removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return (found & modules) - {name}


def test_no_import_cycle():
    files = {
        ".".join(p.with_suffix("").relative_to(REPO).parts).removesuffix(".__init__"): p
        for p in (REPO / "leukemia").rglob("*.py")
    }
    graph = {name: _imports(path, set(files)) for name, path in files.items()}
    # A package imports its own modules by design (leukemia.steps -> leukemia.steps.train).
    graph = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: two modules that import each other are named."""
    package = tmp_path / "leukemia"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    import pytest

    with pytest.raises(AssertionError, match=r"leukemia.a -> leukemia.b -> leukemia.a"):
        test_no_import_cycle()
