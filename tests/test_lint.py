"""`ruff check` (configured in pyproject.toml) is clean over the whole project."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (the test extra has it)")
def test_ruff_is_clean():
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(root)], capture_output=True,
                         text=True, cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
