"""Self-speculative decoding with the MTP module: greedy output is plain greedy's, token for token (with and
without a mesh, with quantized weights); the acceptance counters replay a teacher-forced count; the speculative
sampler keeps the target distribution (a chi-square test, with a wrong twin that keeps the draft's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from model import ExecutionPlan, SamplingParams, generate, quantize_params, shard_params
from model.cli import BUNDLED_CHECKPOINT, load_any
from model.mtp import draft_hits
from model.sampling import accept_draft, draft_keys, filtered_logits, sample
from sharding.mesh import make_mesh

TEXTS = ["Sam has 12 pens and gets 34 more. How many pens does Sam have now?\nAnswer:", "The history of the",
         "def f(x):\n    return"]


@pytest.fixture(scope="module")
def bundled():
    params, cfg, tok = load_any(BUNDLED_CHECKPOINT)
    return params, cfg, [tok.encode(t, add_bos=True) for t in TEXTS], tok.eos_id


def test_greedy_is_plain_greedy_and_the_counters_replay(bundled):
    params, cfg, prompts, eos = bundled
    plain = generate(params, cfg, prompts, max_new_tokens=40, stop_tokens=[eos])
    spec = generate(params, cfg, prompts, max_new_tokens=40, stop_tokens=[eos], speculative=True)
    assert spec.sequences(True) == plain.sequences(True)
    assert np.array_equal(spec.stopped, plain.stopped)
    # the counters, replayed: a verify step at output k drafts t_k, is accepted when the module's teacher-forced
    # draft was right, and emits one token or two
    for row, (p, seq) in enumerate(zip(prompts, plain.sequences(True))):
        hits = draft_hits(params, cfg, p + seq, len(p), 1)[0]  # hits[k - 1]: the draft of output k was right
        k, drafted, accepted = 1, 0, 0
        done = seq[0] == eos
        while not done:
            drafted, accepted = drafted + 1, accepted + int(hits[k - 1])
            k += 1 + int(hits[k - 1] and seq[k] != eos and k + 1 < 40)
            done = seq[k - 1] == eos or k >= 40
        assert (spec.drafted[row], spec.accepted[row]) == (drafted, accepted), row
    assert 0.5 < spec.acceptance < 1 and spec.drafted.sum() < plain.num_generated.sum()


def test_greedy_on_a_mesh_with_quantized_weights(bundled):
    params, cfg, prompts, eos = bundled
    q = quantize_params(params, cfg, "r1_fp4")
    plan = ExecutionPlan(mesh=make_mesh("data=2,expert=4"))
    q = shard_params(q, cfg, plan.mesh)
    plain = generate(q, cfg, prompts, max_new_tokens=16, plan=plan)
    spec = generate(q, cfg, prompts, max_new_tokens=16, plan=plan, speculative=True)
    assert spec.sequences() == plain.sequences() and spec.accepted.sum() > 0


def test_refused_without_an_mtp_module_or_with_the_pallas_decode_kernel(bundled):
    params, cfg, prompts, _ = bundled
    with pytest.raises(ValueError, match="drafts with the MTP module: these parameters have none"):
        generate(params.replace(mtp=None), cfg, prompts, max_new_tokens=4, speculative=True)
    with pytest.raises(ValueError, match="the pallas decode kernel takes one; use attention='xla'"):
        generate(params, cfg, prompts, max_new_tokens=4, speculative=True, backend="pallas")


N_DRAWS = 40_000
FALSE_FAILURE = 1e-6  # the chance this test fails with a correct sampler


@pytest.mark.parametrize("sp", [SamplingParams(temperature=0.8, seed=1),
                                SamplingParams(temperature=1.3, top_k=5, top_p=0.9, seed=2)], ids=["t", "topk_topp"])
def test_the_speculative_sampler_keeps_the_target_distribution(sp):
    """Many independent sequences, one draft each: the verified token's histogram against the target's filtered
    distribution by a chi-square test at a stated false-failure rate; the wrong twin (keeping every draft) follows
    the draft's distribution and must be rejected by the same test."""
    v = 8
    target = jnp.broadcast_to(jax.random.normal(jax.random.key(10), (v,)) * 1.5, (N_DRAWS, v))
    drafter = jnp.broadcast_to(jax.random.normal(jax.random.key(11), (v,)) * 1.5, (N_DRAWS, v))
    rid = jnp.arange(N_DRAWS)
    draft = sample(drafter, draft_keys(sp.seed, rid, 5, 1), sp)
    accepted, token = accept_draft(target, drafter, draft, sp.seed, rid, 5, sp)
    p = np.asarray(jax.nn.softmax(filtered_logits(target[:1], sp))[0], np.float64)

    def chi2_pvalue(tokens):
        counts = np.bincount(np.asarray(tokens), minlength=v)
        keep = p > 0
        if counts[~keep].sum():
            return 0.0  # a token the target never draws
        expected = p[keep] * N_DRAWS
        return stats.chi2.sf(((counts[keep] - expected) ** 2 / expected).sum(), keep.sum() - 1)

    assert chi2_pvalue(token) > FALSE_FAILURE
    assert 0.2 < float(jnp.mean(accepted)) < 0.95  # both branches exercised
    assert chi2_pvalue(draft) < FALSE_FAILURE  # the wrong twin: sampling from the draft


def test_greedy_verification():
    logits = jnp.array([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    accepted, token = accept_draft(logits, -logits, jnp.array([1, 2]), 0, jnp.arange(2), 0, SamplingParams())
    assert accepted.tolist() == [True, False] and token.tolist() == [1, 0]


def test_generate_command_line_speculative(bundled, capsys):
    from model.cli import generate_main
    params, cfg, prompts, eos = bundled
    generate_main(["--speculative", "--temperature", "0", "--max-new-tokens", "12", "--prompt", TEXTS[0]])
    out = capsys.readouterr()
    plain = generate(params, cfg, prompts[:1], max_new_tokens=12, stop_tokens=[eos]).sequences()[0]
    assert out.out == TEXTS[0] + bytes(plain).decode() + "\n" and "MTP drafts accepted" in out.err
    with pytest.raises(SystemExit) as e:
        generate_main(["--speculative", "--backend", "pallas"])
    assert e.value.code == 2 and "--speculative runs on --backend xla" in capsys.readouterr().err
