"""The packages import downward only: model may import quant, sharding and pallas_kernels; pallas_kernels and
sharding may import quant; quant imports none of them. No cycles, no project import inside a function in model/,
and importing the kernels does not load the model."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "sharding", "quant", "pallas_kernels")
ALLOWED = {"model": {"model", "quant", "sharding", "pallas_kernels"}, "pallas_kernels": {"pallas_kernels", "quant"},
           "sharding": {"sharding", "quant"}, "quant": {"quant"}}


def _imports(path: Path):
    """[(imported project package, line, inside a function)] of one file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES:
                    found.append((top, child.lineno, in_function))
            visit(child, inner)
    visit(tree, False)
    return found


def _edges():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for target, line, in_function in _imports(path):
                yield pkg, target, path.relative_to(ROOT), line, in_function


def test_packages_import_downward_only():
    bad = [f"{path}:{line} imports {target}" for pkg, target, path, line, _ in _edges() if target not in ALLOWED[pkg]]
    assert not bad, bad


def test_no_project_imports_inside_functions_in_model():
    bad = [f"{path}:{line} imports {target}" for pkg, target, path, line, inner in _edges()
           if pkg == "model" and inner]
    assert not bad, bad


def test_the_check_sees_a_wrong_edge(tmp_path):
    """The twin: a quant module importing the model is caught, and so is a lazy import in a function."""
    f = tmp_path / "x.py"
    f.write_text("import numpy\nfrom model.params import Params\n\ndef g():\n    from sharding import mesh\n")
    assert _imports(f) == [("model", 2, False), ("sharding", 5, True)]


@pytest.mark.parametrize("package", ["pallas_kernels", "sharding", "quant"])
def test_lower_packages_do_not_load_the_model(package):
    code = (f"import sys, {package}; loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'model'); "
            f"assert not loaded, loaded")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
