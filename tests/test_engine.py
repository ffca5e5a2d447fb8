"""The continuous-batching engine (model/engine.py): under a load of staggered arrivals, mixed prompt lengths
(several prefill chunks, of several requests in one call), mixed lengths and sampling, each request gets the tokens
it gets alone; greedy ones the tokens of `generate`; bad requests are refused by name and the others run on
untouched."""

import numpy as np
import pytest

from model import SamplingParams, generate
from model.cli import BUNDLED_CHECKPOINT, load_any
from model.engine import Engine

TEXTS = ["Sam has 12 pens and gets 34 more. How many pens does Sam have now?\nAnswer:", "The history of the",
         "def f(x):\n    return", "import os\nimport", "Tom has 7 cards and gives 3 away. How many", "a"]
SLOTS, MAX_LEN, CHUNK = 3, 128, 16
SPANS = (48, 64, 128)  # finer than the default ladder (one read of all 128 here), to run the reads' bounds


@pytest.fixture(scope="module")
def bundled():
    params, cfg, tok = load_any(BUNDLED_CHECKPOINT)
    return params, cfg, [tok.encode(t, add_bos=True) for t in TEXTS], tok.eos_id


def _load(eos):
    """(prompt index, max_new_tokens, sampling, request id, the step it arrives at)."""
    return [(0, 20, SamplingParams(), 10, 0), (1, 12, SamplingParams(temperature=0.8, top_p=0.9, seed=3), 11, 0),
            (2, 16, SamplingParams(temperature=1.0, top_k=20, seed=4), 12, 3), (3, 8, SamplingParams(), 13, 0),
            (4, 18, SamplingParams(temperature=0.6, seed=5), 14, 9), (5, 10, SamplingParams(), 15, 20)]


def _run(params, cfg, prompts, eos, load, log=None, mtp=False, decode_steps=1, halt=None, spans=None):
    engine = Engine(params, cfg, slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK, mtp=mtp, decode_steps=decode_steps,
                    spans=spans)
    engine.prefill_batches = []  # how many requests each prefill call took (3 are padded to 4 rows)
    prefill = engine._prefill
    engine._prefill = lambda reqs: (engine.prefill_batches.append(len(reqs)), prefill(reqs))
    pending, reqs = sorted(load, key=lambda x: x[4]), {}
    while pending or not engine.idle:
        while pending and pending[0][4] <= engine.steps:
            i, n, sp, rid, _ = pending.pop(0)
            reqs[rid] = engine.submit(prompts[i], max_new_tokens=n, sampling=sp, stop_tokens=[eos], request_id=rid,
                                      on_token=None if log is None else
                                      lambda r, t: log.append((r.request_id, t)) or (r.request_id, t) == halt)
        engine.step()
    return reqs, engine


@pytest.mark.parametrize("mtp", [False, True], ids=["plain", "mtp"])
def test_each_request_gets_what_it_gets_alone(bundled, mtp):
    """With mtp=True every step verifies each slot's MTP draft: greedy requests still get `generate`'s tokens,
    sampled ones the same tokens alone as under the load."""
    params, cfg, prompts, eos = bundled
    load = _load(eos)
    log = []
    together, engine = _run(params, cfg, prompts, eos, load, log, mtp)
    assert max(len(p) for p in prompts) > 4 * CHUNK // 2 and engine.steps > 20
    assert {1, 3} <= set(engine.prefill_batches)  # chunks of three requests in one call (padded to 4 rows)
    if mtp:
        drafted, accepted = (sum(getattr(r, k) for r in together.values()) for k in ("drafted", "accepted"))
        assert 0 < accepted < drafted
    for item in load:
        alone, _ = _run(params, cfg, prompts, eos, [item[:4] + (0,)], mtp=mtp)
        r = together[item[3]]
        assert r.tokens == alone[item[3]].tokens, item
        assert r.finish_reason in ("stop", "length") and r.ttft_s > 0 and (len(r.tokens) < 2 or r.tpot_s > 0)
        assert [t for rid, t in log if rid == item[3]] == r.tokens  # streamed in order, each once
    greedy = [x for x in load if x[2].greedy]
    ref = generate(params, cfg, [prompts[x[0]] for x in greedy], max_new_tokens=20, stop_tokens=[eos])
    for x, seq in zip(greedy, ref.sequences(True)):
        assert together[x[3]].tokens == seq[:x[1]], x


def test_several_decode_steps_per_call_give_the_same_tokens(bundled):
    """decode_steps=3: three tokens per slot and call; requests that stop, hit their length or are halted by their
    callback inside a call keep exactly the tokens and finish reasons of one step per call, streamed in order, also
    when each call reads only as far as its three steps reach (SPANS)."""
    params, cfg, prompts, eos = bundled
    load = _load(eos)
    plain, _ = _run(params, cfg, prompts, eos, load)
    halt = (11, plain[11].tokens[4])  # request 11's callback ends it at this token
    runs = {}
    for steps in (1, 3):
        log = []
        reqs, _ = _run(params, cfg, prompts, eos, load, log, decode_steps=steps, halt=halt,
                       spans=SPANS if steps == 3 else None)
        runs[steps] = {rid: (r.tokens, r.finish_reason) for rid, r in reqs.items()}
        assert all([t for rid, t in log if rid == k] == r.tokens for k, r in reqs.items())
    assert runs[1] == runs[3]
    assert runs[3][11][1] == "stop" and len(runs[3][11][0]) < len(plain[11].tokens)
    assert {reason for _, reason in runs[3].values()} == {"stop", "length"}
    with pytest.raises(ValueError, match="decode_steps=1"):
        Engine(params, cfg, slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK, mtp=True, decode_steps=2)


def test_bad_requests_are_refused_and_the_others_run_on(bundled):
    params, cfg, prompts, eos = bundled
    engine = Engine(params, cfg, slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK)
    good = [engine.submit(prompts[i], max_new_tokens=10, stop_tokens=[eos], request_id=i) for i in (0, 1)]
    engine.step()
    for kwargs, message in ((dict(prompt=[1] * 120, max_new_tokens=20), "prompt of 120 tokens \\+ max_new_tokens=20 "
                                                                         "exceeds the engine's max_len=128"),
                            (dict(prompt=[1, cfg.vocab_size]), r"prompt token ids out of the vocabulary \[0, 512\)"),
                            (dict(prompt=[1.5, 2.0]), "prompt token ids must be integers"),
                            (dict(prompt=[]), "the prompt is empty"),
                            (dict(sampling={"temperature": 0.5}), "sampling must be a SamplingParams, got dict"),
                            (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
                            (dict(stop_tokens=eos), "stop_tokens must be a list of token ids"),
                            (dict(request_id="a"), "request_id must be an integer")):
        args = dict(prompt=prompts[2], max_new_tokens=5) | kwargs
        with pytest.raises(ValueError, match=message):
            engine.submit(args.pop("prompt"), **args)
    assert len(engine.waiting) == 0
    engine.run()
    alone, _ = _run(params, cfg, prompts, eos, [(0, 10, SamplingParams(), 0, 0), (1, 10, SamplingParams(), 1, 0)])
    assert [r.tokens for r in good] == [alone[0].tokens, alone[1].tokens]
    with pytest.raises(ValueError, match="max_len \\(100\\) must be a multiple of chunk \\(16\\)"):
        Engine(params, cfg, slots=2, max_len=100, chunk=16)


def test_a_call_reads_the_cache_only_up_to_its_span(bundled):
    """Each call reads the shortest of the engine's spans that holds its positions: with NaN in every cache
    position from 64 on (the MTP layer's cache too), requests that stay below 64 get the tokens of a clean engine,
    plain and with MTP; read whole (spans=(max_len,)), the NaN reaches the logits and the request ends in an
    error. The default ladder halves max_len down to 128 positions, four lengths at most."""
    import jax.numpy as jnp

    from model.engine import span_ladder
    params, cfg, prompts, eos = bundled
    assert [span_ladder(64, n) for n in (128, 320, 1024, 32768)] == [
        (128,), (128, 192, 320), (128, 256, 512, 1024), (4096, 8192, 16384, 32768)]

    def run(poison, mtp=False, spans=SPANS):
        engine = Engine(params, cfg, slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK, mtp=mtp, spans=spans)
        for name in ("cache", "mtp") if poison else ():
            c = getattr(engine, name)
            if c is not None:
                setattr(engine, name, c.replace(c_kv=c.c_kv.at[:, :, 64:].set(jnp.nan),
                                                k_pe=c.k_pe.at[:, :, 64:].set(jnp.nan)))
        reqs = [engine.submit(prompts[i], max_new_tokens=12, request_id=i) for i in (1, 3)]
        engine.run()
        assert max(len(prompts[i]) for i in (1, 3)) + 12 <= 64
        return [(r.tokens, r.finish_reason) for r in reqs]

    assert Engine(params, cfg, slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK).spans == (128,)
    for mtp in (False, True):
        clean = run(False, mtp)
        assert run(True, mtp) == clean and {reason for _, reason in clean} == {"length"}
    assert {reason for _, reason in run(True, spans=(MAX_LEN,))} == {"error"}
    for spans in ((16, 64), (64, 32, 128), (0, 128), 128, ()):
        with pytest.raises(ValueError, match="spans must be increasing read lengths ending at max_len=128"):
            Engine(params, cfg, slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK, spans=spans)


def test_per_row_sampling_is_the_batch_sampler():
    """The engine's sampler, one parameter set per row, equals `sample` with each row's parameters."""
    import jax
    import jax.numpy as jnp

    from model.sampling import row_keys, sample, sample_rows, step_keys
    logits = jax.random.normal(jax.random.key(0), (4, 64)) * 3
    sps = [SamplingParams(), SamplingParams(temperature=0.7, seed=2), SamplingParams(temperature=1.2, top_k=5,
                                                                                   seed=3),
           SamplingParams(temperature=0.9, top_p=0.5, seed=4)]
    rid, step = jnp.arange(4), jnp.full(4, 7)
    got = sample_rows(logits, row_keys(jnp.array([s.seed for s in sps]), rid, step),
                      jnp.array([s.temperature for s in sps]), jnp.array([s.top_k for s in sps]),
                      jnp.array([s.top_p for s in sps]))
    want = [int(sample(logits[i:i + 1], step_keys(sp.seed, rid[i:i + 1], 7), sp)[0]) for i, sp in enumerate(sps)]
    assert np.asarray(got).tolist() == want


def test_a_load_runs_through_the_engine_closed_and_open_loop(bundled):
    from model.load import Load, metrics, run_load
    params, cfg, _, _ = bundled
    load = Load(5, (4, 40), (2, 6), seed=1)
    items = load.items(cfg.vocab_size)
    for kwargs in (dict(concurrency=2), dict(rate=200.0)):
        engine = Engine(params, cfg, slots=2, max_len=64, chunk=CHUNK)
        reqs, secs = run_load(engine, items, **kwargs)
        assert [len(r.tokens) for r in reqs] == [n for _, n in items] and engine.idle
        m = metrics(reqs, secs)
        assert m["output_tokens"] == sum(n for _, n in items) and m["total_tok_s"] > 0
        assert m["ttft_ms"]["median"] > 0 and m["per_user_tok_s"]["p90"] >= m["per_user_tok_s"]["median"]
    with pytest.raises(ValueError, match="output_len must be a range 1 <= lo <= hi, got \\(3, 2\\)"):
        Load(1, (1, 1), (3, 2))


def test_the_engine_on_a_mesh(bundled):
    """Slots split over the batch axis, experts over the expert axis: the same greedy tokens as on one device."""
    from model import ExecutionPlan, shard_params
    from sharding.mesh import make_mesh
    params, cfg, prompts, eos = bundled
    plan = ExecutionPlan(mesh=make_mesh("data=2,expert=4"))
    engine = Engine(shard_params(params, cfg, plan.mesh), cfg, slots=2, max_len=MAX_LEN, chunk=CHUNK, plan=plan)
    reqs = [engine.submit(prompts[i], max_new_tokens=8, stop_tokens=[eos], request_id=i) for i in (0, 1, 2)]
    engine.run()
    alone, _ = _run(params, cfg, prompts, eos, [(i, 8, SamplingParams(), i, 0) for i in (0, 1, 2)])
    assert [r.tokens for r in reqs] == [alone[i].tokens for i in (0, 1, 2)]
    with pytest.raises(ValueError, match="batch=3 is not divisible by mesh axes data of size 2"):
        Engine(params, cfg, slots=3, max_len=MAX_LEN, chunk=CHUNK, plan=plan)


def test_pallas_decode_attention(bundled, monkeypatch):
    """attention="pallas": the decode steps run the decode kernel (interpret mode here), the prompt chunks the xla
    attention; the same greedy tokens as the xla plan. Refused with MTP's two-token verify step, and for a cache
    the kernel's 16-slot tiles do not divide."""
    import model.mla
    from model import ExecutionPlan
    params, cfg, prompts, eos = bundled
    traced = []  # the kernel traced into the decode program
    kernel = model.mla.decode_attention
    monkeypatch.setattr(model.mla, "decode_attention", lambda *a: traced.append(a[0].shape) or kernel(*a))
    out = {}
    for attention in ("xla", "pallas"):
        engine = Engine(params, cfg, slots=2, max_len=48, chunk=CHUNK, plan=ExecutionPlan(attention=attention))
        reqs = [engine.submit(prompts[i], max_new_tokens=5, stop_tokens=[eos], request_id=i) for i in (1, 3)]
        engine.run()
        out[attention] = [r.tokens for r in reqs]
    assert out["pallas"] == out["xla"] and all(len(t) == 5 for t in out["xla"])
    assert traced and all(shape[0] == 2 for shape in traced)  # q [slots, heads, C]: the decode steps
    pallas = ExecutionPlan(attention="pallas")
    with pytest.raises(ValueError, match="mtp=True verifies two tokens per step"):
        Engine(params, cfg, slots=2, max_len=48, chunk=CHUNK, plan=pallas, mtp=True)
    with pytest.raises(ValueError, match="max_len must be a multiple of 16, got 40"):
        Engine(params, cfg, slots=2, max_len=40, chunk=8, plan=pallas)


def test_the_benchmark_command(tmp_path, capsys):
    """scripts/benchmark.py on the bundled model: a small load at two concurrencies with two decode steps per call
    writes one row each, every request's tokens counted; --mtp with several decode steps, spans that do not end at
    the cache length, and a --max-len that does not hold the load, are usage errors."""
    import importlib.util
    import json
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("benchmark_script",
                                                  Path(__file__).parents[1] / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    bench.main(["--requests", "3", "--input-len", "5:20", "--output-len", "3:6", "--concurrency", "1", "2",
                "--decode-steps", "2", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["decode_steps"] == 2 and res["max_len"] == 64 and res["spans"] == [64]
    assert [r["concurrency"] for r in res["rows"]] == [1, 2]
    assert all(r["requests"] == 3 and 9 <= r["output_tokens"] <= 18 for r in res["rows"])
    assert "2 decode steps per call" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench.main(["--mtp", "--decode-steps", "2"])
    assert e.value.code == 2 and "leave --decode-steps at 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main(["--input-len", "64", "--output-len", "64", "--spans", "64"])
    assert e.value.code == 2 and "--spans: spans must be increasing read lengths ending at max_len=128" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main(["--input-len", "64", "--output-len", "64", "--max-len", "96"])
    assert e.value.code == 2 and "--max-len 96 must hold the longest request (128 positions)" in \
        capsys.readouterr().err
