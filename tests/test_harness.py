"""The lm-evaluation-harness adapter: its log-likelihoods are the model's own scoring, its generations are the
model's greedy ones cut at the stop strings, and local tasks in the harness's format run end to end."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from model import generate
from model.harness import HarnessModel
from model.train.evaluate import _score

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "harness"


def nll(params, cfg, ids):
    return float(_score(params, jnp.asarray([ids], jnp.int32), cfg=cfg)[0])


def test_scores_and_generations_are_the_models_own(bundled_model):
    params, cfg, tok = bundled_model
    hm = HarnessModel(params, cfg, tok, batch_size=8)  # as the end-to-end run below: the same programs
    docs = [json.loads(line) for line in (TASKS / "arithmetic.jsonl").read_text().splitlines()[:3]]
    pairs = [("def parse(text):\n    \"\"\"Return the", " number of"), ("", "The module"),
             (docs[0]["worked_stem"], " " + docs[0]["answer"]), (docs[1]["worked_stem"], " 3"),
             ("abc", "")]
    got = hm.loglikelihood(pairs)
    for (ctx, cont), (lp, _) in zip(pairs, got):  # -[nll(bos ctx cont) - nll(bos ctx)], scored without a cache
        full, head = tok.encode(ctx + cont, add_bos=True), tok.encode(ctx, add_bos=True)
        want = -(nll(params, cfg, full) - nll(params, cfg, head)) if cont else 0.0
        assert lp == pytest.approx(want, abs=2e-3, rel=1e-4), (ctx, cont)
    assert got[2][1] and not got[3][1]  # the right answer is the greedy one, a wrong one is not

    text = (TASKS / "text.jsonl").read_text().splitlines()[0]
    text = json.loads(text)["text"]
    ids = tok.encode(text, add_bos=True)
    (whole,) = hm.loglikelihood_rolling([(text,)])
    assert whole == pytest.approx(-nll(params, cfg, ids), abs=2e-3, rel=1e-4)
    windows = HarnessModel(params, cfg, tok, batch_size=8, max_length=64)
    (rolled,) = windows.loglikelihood_rolling([(text,)])
    assert np.isfinite(rolled) and rolled != pytest.approx(whole, abs=1e-3)  # shorter contexts: another number

    prompts = [d["prompt"] for d in docs]
    outs = hm.generate_until([(p, {"until": ["\n"], "max_gen_toks": 64}) for p in prompts] +
                             [(prompts[0], {"until": [","], "max_gen_toks": 64})])
    ref = generate(params, cfg, [tok.encode(p, add_bos=True) for p in prompts], max_new_tokens=64,
                   stop_tokens=[tok.encode("\n")[0], tok.eos_id])
    for out, ids in zip(outs, ref.sequences()):
        assert out == tok.decode(ids).split("\n")[0]
    assert outs[3] == outs[0].split(",")[0]  # a stop string ends the text before it
    assert sum(o.endswith(d["answer"]) for o, d in zip(outs, docs)) >= 2

    for bad, message in ((lambda: hm.generate_until([("x", {"until": ["\n"], "num_beams": 4})]),
                          r"generation settings \['num_beams'\] are not supported"),
                         (lambda: HarnessModel(params, cfg, tok, max_length=1), "max_length must be an integer"),
                         (lambda: hm.loglikelihood([("x", "y" * 5000)]), "longer than max_length")):
        with pytest.raises(ValueError, match=message):
            bad()


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_local_tasks_run_end_to_end_with_lm_eval(tmp_path):
    """The one command, as a user runs it (its own process: the harness's dependencies stay out of the tests')."""
    out = tmp_path / "results.json"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "scripts/harness.py", "--tasks", "r1jax_arithmetic",
                          "r1jax_arithmetic_choice", "r1jax_text", "--include-path", str(TASKS), "--batch-size", "8",
                          "--limit", "8", "--bootstrap-iters", "0", "--output", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert res["r1jax_arithmetic"]["exact_match,final-answer"] >= 0.5
    assert res["r1jax_arithmetic_choice"]["acc,none"] >= 0.5
    assert 0 < res["r1jax_text"]["bits_per_byte,none"] < 4
    assert "r1jax_arithmetic_choice" in run.stdout
