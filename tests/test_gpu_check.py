"""scripts/gpu_check.py works before any device time is spent: the whole dry run (every stage, tiny sizes,
interpret mode) writes its JSON and markdown with every case measured, and the runner keeps going past a failing
case, a failing stage and an exhausted budget, writing what it has after each case."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPTS / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_measures_every_stage(gpu_check, tmp_path):
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["dry_run"] and data["env"]["jax"]
    stages = data["stages"]
    assert list(stages) == [s for s in gpu_check.STAGES if s != "env"]
    for name, rec in stages.items():
        assert rec["status"] == "ok", (name, rec["errors"])
        assert rec["rows"], name
    assert all(r["within_tolerance"] for r in stages["correct"]["rows"])
    kinds = {r["case"].split()[0] for r in stages["kernels"]["rows"]}
    assert kinds == {"grouped_matmul", "mla_decode", "mla_prefill", "sweep"}
    for r in stages["kernels"]["rows"]:
        assert r["pallas_ms"] > 0 and r["floor_ms"] > 0 and r["rel_err_vs_xla"] < 2e-2, r
    layer = stages["layer"]["rows"]
    assert {(r["experts"], r["backend"], r["phase"]) for r in layer} == {
        (f, b, p) for f in ("bf16", "fp8", "nvfp4") for b in ("xla", "pallas") for p in ("decode", "prefill")}
    assert all(r["tokens_per_s"] > 0 for r in stages["model"]["rows"])
    md = (tmp_path / "gpu_check.md").read_text()
    for name in stages:
        assert f"## {name}: ok" in md


def test_failures_and_budgets_are_recorded_and_the_run_goes_on(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.BUDGETS, "first", 0.05)
    monkeypatch.setitem(gpu_check.BUDGETS, "second", 10)
    run = gpu_check.Run(tmp_path, dry=True, scale=1.0)

    def first():
        yield "fine", lambda: {"value": 1}
        yield "broken", lambda: 1 / 0
        yield "slow", lambda: time.sleep(0.1) or {"value": 2}
        yield "never", lambda: {"value": 3}

    def second():
        raise RuntimeError("setup failed")
        yield  # a generator whose setup raises

    run.stage("first", first())
    after_first = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]["first"]
    run.stage("second", second())
    rec = run.data["stages"]
    assert rec["first"] == after_first  # written as it went
    assert [r["case"] for r in rec["first"]["rows"]] == ["fine", "slow"]
    assert rec["first"]["errors"][0]["case"] == "broken" and "ZeroDivisionError" in rec["first"]["errors"][0]["error"]
    assert rec["first"]["status"] == "budget" and "after 3 cases (next: never)" in rec["first"]["note"]
    assert rec["second"]["status"] == "failed" and "setup failed" in rec["second"]["errors"][0]["error"]
    assert "## second: failed" in (tmp_path / "gpu_check.md").read_text()


def test_bad_arguments_are_refused(gpu_check, tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main([str(tmp_path), "--stages", "meters,warp"])
    assert "unknown stages ['warp']" in capsys.readouterr().err
