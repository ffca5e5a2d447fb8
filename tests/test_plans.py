"""Every execution plan against the reference: attention {xla, pallas} x experts {grouped, gather, dense, pallas} x
mesh {none, expert=8 psum, expert=8 all_to_all, expert=4 x tensor=2} on TINY (a 517-token vocabulary the meshes
pad) with a 512-token prompt; each either equals the plain reference (XLA attention, dense experts, one device)
in prefill and decode, or is refused before anything is traced. The wrong twin (an off-by-one expert offset)
fails. Training through every plan that has gradients equals the dense reference; the others are refused."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import TINY, ExecutionPlan, decode_step, init_cache, prefill, shard_cache, shard_params
from model.train.training import TrainConfig, loss_fn
from sharding import make_mesh
from tests.helpers import fresh_jit_caches, random_params
from tests.tolerances import rel_err

CFG = TINY.replace(vocab_size=517, max_position_embeddings=1024)
MESHES = {"one device": (None, "auto"), "expert=8 psum": ("expert=8", "psum"),
          "expert=8 all_to_all": ("expert=8", "all_to_all"), "expert=4,tensor=2": ("expert=4,tensor=2", "auto")}
LENGTHS = np.array([512, 389])


def _plan(attention, experts, mesh) -> ExecutionPlan:
    spec, dispatch = MESHES[mesh]
    return ExecutionPlan(attention=attention, experts=experts, mesh=spec and make_mesh(spec), dispatch=dispatch)


def _run(params, plan, tokens):
    """(prefill logits at every position [B, T, V], one decode step's logits [B, V] or the refusal)."""
    cache = init_cache(CFG, 2, tokens.shape[1] + 16)  # the decode kernel reads the cache in 16-row tiles
    if plan.mesh is not None:
        params, cache = shard_params(params, CFG, plan.mesh), shard_cache(cache, plan.mesh)
    logits, cache = prefill(params, cache, tokens, LENGTHS, cfg=CFG, all_logits=True, plan=plan)
    try:
        step, _ = decode_step(params, cache, tokens[:, 0], cfg=CFG, plan=plan)
    except ValueError as e:
        return np.asarray(logits), e
    return np.asarray(logits), np.asarray(step)


@pytest.fixture(scope="module")
def setup():
    params = random_params(CFG, seed=21)
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 512)).astype(np.int32)
    return params, tokens, _run(params, ExecutionPlan(experts="dense"), tokens)


def _compare(got, want):
    prefill_err = max(rel_err(got[0][b, :n], want[0][b, :n]) for b, n in enumerate(LENGTHS))
    return prefill_err, (got[1] if isinstance(got[1], ValueError) else rel_err(got[1], want[1]))


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("experts", ["grouped", "gather", "dense", "pallas"])
@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_every_plan_equals_the_reference_or_is_refused(setup, attention, experts, mesh):
    params, tokens, want = setup
    plan = _plan(attention, experts, mesh)
    prefill_err, decode = _compare(_run(params, plan, tokens), want)
    assert prefill_err < 1e-4, prefill_err
    if isinstance(decode, ValueError):  # 2 decode tokens cannot split over 8 all_to_all ranks: refused, by name
        assert plan.dispatch == "all_to_all" and "split evenly" in str(decode)
    else:
        assert decode < 1e-4, decode


@pytest.mark.parametrize("mesh", ["one device", "expert=8 psum"])
def test_an_off_by_one_expert_offset_fails(setup, mesh, monkeypatch):
    """The twin: every layer reading its neighbour's experts (offset + 1) must not pass as the reference."""
    import model.moe as moe
    params, tokens, want = setup
    real = moe.expert_view

    def shifted(we1, we3, we2, layer):
        v = real(we1, we3, we2, layer)
        return v.replace(offset=v.offset + 1)
    monkeypatch.setattr(moe, "expert_view", shifted)
    fresh_jit_caches()
    try:
        prefill_err, _ = _compare(_run(params, _plan("xla", "grouped", mesh), tokens), want)
    finally:
        monkeypatch.undo()
        fresh_jit_caches()
    assert prefill_err > 1e-2, prefill_err


TRAIN_PLANS = [("grouped", None), ("gather", None), ("pallas", None), ("grouped", "expert=8")]  # dense: the reference


@pytest.mark.parametrize("experts, mesh", TRAIN_PLANS)
def test_training_through_each_plan_equals_the_dense_reference_or_is_refused(experts, mesh):
    tc = TrainConfig()
    p = random_params(TINY, seed=8, with_mtp=True)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 33)), jnp.int32)
    plan = ExecutionPlan(experts=experts, mesh=mesh and make_mesh(mesh))
    if experts == "pallas" or mesh is not None:
        with pytest.raises(ValueError, match="gradients|one device"):
            plan.check("train")
        return
    plan.check("train")
    value = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnames=("cfg", "tc", "plan"))
    (loss, metrics), grads = value(p, tokens, TINY, tc, plan=plan)
    (ref, ref_metrics), ref_grads = value(p, tokens, TINY, tc, plan=ExecutionPlan(experts="dense"))
    assert abs(float(loss) - float(ref)) < 1e-5 * abs(float(ref))
    np.testing.assert_array_equal(np.asarray(metrics["load"]), np.asarray(ref_metrics["load"]))
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_plans_are_checked_when_built():
    for bad, needle in ((dict(attention="cuda"), "attention='cuda'"), (dict(experts="single"), "experts='single'"),
                        (dict(dispatch="ring"), "dispatch='ring'"), (dict(mesh="expert=8"), "jax.sharding.Mesh")):
        with pytest.raises(ValueError, match=needle):
            ExecutionPlan(**bad)
    with pytest.raises(ValueError, match="either plan= or backend="):
        ExecutionPlan.build(ExecutionPlan(), backend="pallas")
    assert hash(ExecutionPlan(mesh=make_mesh("expert=8"))) == hash(ExecutionPlan(mesh=make_mesh("expert=8")))
