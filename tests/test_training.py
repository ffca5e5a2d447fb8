import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import TINY
from model.forward import forward
from model.io.checkpoint import read_meta
from model.io.hf_checkpoint import CheckpointError
from model.io.tokenizer import ByteTokenizer
from model.plan import ExecutionPlan
from model.train.data import Batcher, problems, stdlib_corpus
from model.train.trainer import train
from model.train.training import TrainConfig, loss_fn, make_optimizer, segment_positions, train_step, update_router_bias
from tests.helpers import random_params

CFG = TINY.replace(num_nextn_predict_layers=1, bos_token_id=256, eos_token_id=257)


def test_short_training_run_lowers_the_loss():
    tc = TrainConfig(steps=30, batch=4, seq_len=64, warmup=5, lr=3e-3)
    _, hist = train(CFG, tc, None, log=io.StringIO(), log_every=1)
    first, last = np.mean([h["ce"] for h in hist[:3]]), np.mean([h["ce"] for h in hist[-3:]])
    assert last < first - 0.5, (first, last)
    assert np.isfinite(hist[-1]["mtp_ce"]) and hist[-1]["mtp_ce"] < hist[0]["mtp_ce"]


def test_router_bias_moves_against_the_load():
    p = random_params(CFG, seed=0, with_mtp=True)
    n = p.moe_layers.ffn.e_bias.shape[0]
    rng = np.random.default_rng(0)
    load = jnp.asarray(rng.integers(0, 100, size=(n + 1, CFG.n_routed_experts)), jnp.float32)
    new = update_router_bias(p, load, 0.01)
    delta = np.asarray(new.moe_layers.ffn.e_bias - p.moe_layers.ffn.e_bias)
    over = np.asarray(load[:n] > load[:n].mean(-1, keepdims=True))
    assert np.all(delta[over] < 0) and np.all(delta[~over & (np.asarray(load[:n]) < np.asarray(
        load[:n].mean(-1, keepdims=True)))] > 0)
    dm = np.asarray(new.mtp.layer.ffn.e_bias - p.mtp.layer.ffn.e_bias)
    assert np.all(np.sign(dm) == -np.sign(np.asarray(load[n] - load[n].mean())))


def test_train_step_updates_bias_by_the_rule_not_by_gradient():
    tc = TrainConfig(steps=10, batch=2, seq_len=32, bias_update_speed=0.01)
    p = random_params(CFG, seed=1, with_mtp=True)
    old_bias = np.asarray(p.moe_layers.ffn.e_bias)
    opt = make_optimizer(tc)
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 33)).astype(np.int32)
    p2, _, m = train_step(p, opt.init(p), tokens, cfg=CFG, tc=tc, opt=opt)
    load = np.asarray(m["load"])[:old_bias.shape[0]]
    want = old_bias - 0.01 * np.sign(load - load.mean(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(p2.moe_layers.ffn.e_bias), want, atol=1e-7)
    assert m["load"].shape == (CFG.n_moe_layers + 1, CFG.n_routed_experts)


def test_packed_documents_see_only_themselves():
    """A packed row's second document gives the same hidden states and loss terms as that document alone."""
    tok = ByteTokenizer()
    b = Batcher(stdlib_corpus(), tok, 256, 2, seed=0, text_frac=0.0, answer_weight=3.0)
    tokens, seg, w = b.next_batch()
    assert seg[0, 0] == 0 and seg[0].max() >= 1 and np.all(np.diff(seg[0]) >= 0)
    starts = np.flatnonzero(np.diff(seg[0])) + 1
    assert np.all(tokens[0, starts] == tok.bos_id) and tokens[0, 0] == tok.bos_id
    # worked answers (after 'Answer:') are weighted, questions are not
    first = tok.decode(tokens[0, :starts[0]].tolist())
    n_q = len(tok.encode(first.split("Answer:")[0] + "Answer:", add_bos=True))
    assert np.all(w[0, :n_q] == 1.0) and np.all(w[0, n_q:starts[0]] == 3.0)

    p = random_params(CFG, seed=0, with_mtp=True)
    lo, hi = starts[0], starts[1] if len(starts) > 1 else tokens.shape[1]
    inp = jnp.asarray(tokens[:1, :-1])
    segs = jnp.asarray(seg[:1, :-1])
    pos = segment_positions(segs)
    assert int(pos[0, lo]) == 0 and int(pos[0, lo - 1]) == lo - 1
    packed, _, _ = forward(p, None, inp, pos, segs, CFG, ExecutionPlan(), "train")
    alone_tok = jnp.asarray(tokens[:1, lo:hi])
    alone, _, _ = forward(p, None, alone_tok, jnp.arange(hi - lo)[None], None, CFG, ExecutionPlan(), "train")
    n = min(hi, inp.shape[1]) - lo
    np.testing.assert_allclose(np.asarray(packed[0, lo:lo + n]), np.asarray(alone[0, :n]), rtol=2e-5, atol=2e-5)
    # the twin: without the document mask the second problem sees the first, and differs
    leaky, _, _ = forward(p, None, inp, pos, None, CFG, ExecutionPlan(), "train")
    assert np.abs(np.asarray(leaky[0, lo:lo + n]) - np.asarray(alone[0, :n])).max() > 1e-2


def test_packed_loss_skips_cross_document_targets():
    tc = TrainConfig()
    p = random_params(CFG, seed=2, with_mtp=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(1, 41)).astype(np.int32)
    seg = np.zeros((1, 41), np.int32)
    seg[:, 20:] = 1
    w = np.ones((1, 41), np.float32)
    base, _ = loss_fn(p, tokens, CFG, tc, seg, w)
    # the first token of document 1 is predicted by document 0's last token: its weight must not matter
    w2 = w.copy()
    w2[0, 20] = 100.0
    other, _ = loss_fn(p, tokens, CFG, tc, seg, w2)
    np.testing.assert_allclose(float(base), float(other), rtol=1e-6)
    # and a token inside a document does count
    w2[0, 25] = 100.0
    assert abs(float(loss_fn(p, tokens, CFG, tc, seg, w2)[0]) - float(base)) > 1e-3


def test_heldout_splits_never_reach_training():
    rng = np.random.default_rng(0)
    assert not any(p.heldout for p in problems(rng, 500, heldout=False))
    assert all(p.heldout for p in problems(rng, 50, heldout=True))
    corpus = stdlib_corpus()
    assert len(corpus.train) > 1_000_000 and len(corpus.heldout) > 50_000
    b = Batcher(corpus, ByteTokenizer(), 64, 4, seed=0)
    batch = b.next_batch()
    assert batch.tokens.shape == batch.segments.shape == batch.weights.shape == (4, 65)
    # whole docstrings repeated across modules are dropped from held-out; a shared paragraph may remain
    starts = np.random.default_rng(0).integers(0, len(corpus.heldout) - 200, 200)
    overlap = sum(corpus.heldout[s:s + 200] in corpus.train for s in starts)
    assert overlap <= 2, f"{overlap} of 200 held-out windows occur in the training text"


@pytest.mark.parametrize("text", ["", "plain ascii", "naïve café — 東京 🚀 \U0010ffff", "\x00\x01 control\n\t",
                                  "".join(chr(c) for c in range(0x20, 0x3000, 7))])
def test_byte_tokenizer_round_trips_utf8(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_id and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == text
    dec = tok.stream_decoder()
    assert "".join(dec(i) for i in ids) == text


def test_byte_tokenizer_random_strings():
    rng = np.random.default_rng(0)
    tok = ByteTokenizer()
    for _ in range(200):
        cps = rng.integers(0, 0x10FFFF, size=rng.integers(0, 30))
        text = "".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF)
        assert tok.decode(tok.encode(text)) == text


def test_worked_answers_are_right_step_by_step():
    """Every step of every worked answer is true arithmetic, and the text after the last '=' is the answer."""
    import re

    from model.train.data import KINDS, problems
    rng = np.random.default_rng(0)
    for p in problems(rng, 400, heldout=False, kinds=KINDS):
        steps = p.worked.split(": ", 1)[1].split(", ")
        assert steps[-1] == f"answer = {p.answer}"
        for step in steps[:-1]:
            lhs, rhs = step.split(" = ")
            assert re.fullmatch(r"[\d+\-* ]+", lhs) and eval(lhs) == int(rhs), step
        assert p.text().endswith(f"answer = {p.answer}\n")


def test_training_is_deterministic_and_continues_from_a_checkpoint(tmp_path):
    tc = TrainConfig(steps=3, batch=2, seq_len=32, warmup=1)
    p1, h1 = train(CFG, tc, tmp_path / "a", log=io.StringIO(), log_every=1)
    _, h1_again = train(CFG, tc, None, log=io.StringIO(), log_every=1)  # the same seed: the same run
    assert [h["loss"] for h in h1] == [h["loss"] for h in h1_again]
    # lr 0 and bias speed 0: continuing changes nothing, so equal params show they came from the checkpoint
    still = dataclasses.replace(tc, init_from=str(tmp_path / "a"), lr=0.0, bias_update_speed=0.0, seed=1)
    p2, _ = train(CFG, still, tmp_path / "b", log=io.StringIO())
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    lineage = read_meta(tmp_path / "b")["training"]["init_from"]
    assert lineage["path"] == str(tmp_path / "a") and lineage["training"]["steps"] == 3
    moving = dataclasses.replace(still, lr=3e-3, bias_update_speed=0.02)
    p3, _ = train(CFG, moving, None, log=io.StringIO())
    assert not np.array_equal(p3.embed, p1.embed)
    assert not np.array_equal(p3.moe_layers.ffn.e_bias, p1.moe_layers.ffn.e_bias)
    # same tensor shapes, different config: refused before any step
    with pytest.raises(CheckpointError, match="config differs") as err:
        train(CFG.replace(rms_norm_eps=1e-5), still, None, log=io.StringIO())
    assert "'rms_norm_eps': (1e-06, 1e-05)}" in str(err.value)  # that field, and no other
    with pytest.raises(CheckpointError, match="does not exist"):
        train(CFG, dataclasses.replace(still, init_from=str(tmp_path / "nope")), None, log=io.StringIO())
