"""The notebooks run top to bottom (as scripts/notebooks.py runs them: one namespace, each cell in order, in the
notebook's directory), save every plot they draw as an image, and are kept with their outputs cleared."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _runner():
    spec = importlib.util.spec_from_file_location("notebooks_script", ROOT / "scripts" / "notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_notebooks_are_there_with_outputs_cleared():
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "routing", "quantization", "r1_671b"}
    for p in NOTEBOOKS:
        for cell in json.loads(p.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, p.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_notebook_runs_and_saves_its_plots(path, tmp_path):
    runner = _runner()
    records = runner.run(path, tmp_path)
    code = [r for r in records if r["kind"] == "code"]
    saved = [f for r in code for f in r["figures"]]
    assert len(saved) == sum(r["source"].count(".savefig(") for r in code) >= 1
    assert all((tmp_path / f).stat().st_size > 1000 for f in saved)
    page = runner.render(path.stem, records, 1.0)
    assert all(f"![{f}]({f})" in page for f in saved)


def test_a_failing_cell_names_the_notebook_and_the_cell(tmp_path):
    bad = tmp_path / "bad.ipynb"
    bad.write_text(json.dumps({"cells": [{"cell_type": "code", "source": "x = 1\n", "outputs": [],
                                          "execution_count": None, "metadata": {}},
                                         {"cell_type": "code", "source": ["y = x + 1\n", "z = y + undefined_name\n"],
                                          "outputs": [], "execution_count": None, "metadata": {}}],
                               "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    with pytest.raises(RuntimeError, match=r"bad.ipynb, cell 1: NameError: name 'undefined_name'"):
        _runner().run(bad, tmp_path / "figures")
