import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import TINY, ExecutionPlan
from model.moe import (
    expert_view,
    experts_dense,
    experts_gather,
    experts_grouped,
    experts_pallas,
    grouped_swiglu,
    moe,
    route,
)
from tests.helpers import random_params
from tests.tolerances import OP_ATOL


def numpy_route(x, w_router, bias, cfg, group_score="top2_sum", bias_in_weights=False):
    """Plain numpy, one token at a time: DeepSeek-V3's noaux_tc rule (group-limited top-k)."""
    s = 1 / (1 + np.exp(-(x.astype(np.float64) @ w_router.astype(np.float64))))
    per_group = cfg.n_routed_experts // cfg.n_group
    weights, ids = [], []
    for t in range(x.shape[0]):
        choice = s[t] + bias
        groups = choice.reshape(cfg.n_group, per_group)
        if group_score == "top2_sum":
            gscore = np.sort(groups, axis=1)[:, -2:].sum(1)
        else:
            gscore = groups.max(1)
        kept = np.argsort(-gscore, kind="stable")[:cfg.topk_group]
        allowed = np.full(cfg.n_routed_experts, -np.inf)
        for g in kept:
            allowed[g * per_group:(g + 1) * per_group] = choice[g * per_group:(g + 1) * per_group]
        top = np.argsort(-allowed, kind="stable")[:cfg.num_experts_per_tok]
        w = (choice if bias_in_weights else s[t])[top]
        w = w / w.sum() * cfg.routed_scaling_factor
        order = np.argsort(top)
        weights.append(w[order])
        ids.append(top[order])
    return np.array(weights), np.array(ids)


def _sorted_by_id(w, idx):
    w, idx = np.asarray(w), np.asarray(idx)
    order = np.argsort(idx, axis=1)
    return np.take_along_axis(w, order, 1), np.take_along_axis(idx, order, 1)


@pytest.fixture(scope="module")
def moe_params():
    return jax.tree.map(lambda a: a[0], random_params(TINY, seed=3).moe_layers.ffn)


def test_router_matches_numpy_reference(moe_params):
    x = np.random.default_rng(0).standard_normal((64, TINY.hidden_size)).astype(np.float32)
    w, idx, _ = route(moe_params, jnp.asarray(x), TINY)
    w, idx = _sorted_by_id(w, idx)
    rw, ridx = numpy_route(x, np.asarray(moe_params.w_router), np.asarray(moe_params.e_bias, np.float64), TINY)
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_allclose(w, rw, atol=1e-6)
    # every token's experts come from at most topk_group groups
    groups = idx // (TINY.n_routed_experts // TINY.n_group)
    assert max(len(set(g)) for g in groups) <= TINY.topk_group


@pytest.mark.parametrize("twin", [dict(group_score="max"), dict(bias_in_weights=True)])
def test_router_reference_twins_differ(moe_params, twin):
    """The numpy reference is sensitive to the rule's details: a wrong group score or biased weights differ."""
    x = np.random.default_rng(0).standard_normal((64, TINY.hidden_size)).astype(np.float32)
    w, idx = _sorted_by_id(*route(moe_params, jnp.asarray(x), TINY)[:2])
    rw, ridx = numpy_route(x, np.asarray(moe_params.w_router), np.asarray(moe_params.e_bias, np.float64), TINY,
                           **twin)
    assert not (np.array_equal(idx, ridx) and np.allclose(w, rw, atol=1e-6))


def _view(p):
    return expert_view(p.we1, p.we3, p.we2, None)


@pytest.mark.parametrize("tokens", [1, 3, 37, 200])
def test_every_implementation_matches_the_dense_reference(moe_params, tokens):
    x = jnp.asarray(np.random.default_rng(tokens).standard_normal((tokens, TINY.hidden_size)), jnp.float32)
    w, idx, _ = route(moe_params, x, TINY)
    ref = experts_dense(x, w, idx, _view(moe_params))
    impls = (experts_gather, experts_grouped) + ((experts_pallas,) if tokens in (3, 37) else ())
    for fn in impls:
        np.testing.assert_allclose(fn(x, w, idx, _view(moe_params)), ref, atol=OP_ATOL["float32"], rtol=1e-5,
                                   err_msg=fn.__name__)


def test_pairs_of_other_devices_contribute_nothing(moe_params):
    """Expert parallelism hands each implementation ids local to its experts: a pair outside [0, n) is another
    device's. Every implementation on ids shifted by -8 computes exactly the experts 8..15 part."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal((11, TINY.hidden_size)), jnp.float32)
    w, idx, _ = route(moe_params, x, TINY)
    p = moe_params
    upper = expert_view(*(a[8:] for a in (p.we1, p.we3, p.we2)), None)
    want = experts_dense(x, jnp.where(idx >= 8, w, 0.0), idx, _view(p))
    for fn in (experts_dense, experts_gather, experts_grouped, experts_pallas):
        np.testing.assert_allclose(fn(x, w, idx - 8, upper), want, atol=OP_ATOL["float32"], rtol=1e-5,
                                   err_msg=fn.__name__)


def test_grouped_swiglu_handles_empty_and_ragged_groups(moe_params):
    """Tiles of 8 rows over ragged groups: a tile running past its expert's rows writes into the next experts'
    rows, which their own tiles overwrite; the rows past the groups (another device's pairs) come back as zeros.
    The twin: the same rows split one row differently between two experts must not match."""
    rng = np.random.default_rng(1)
    sizes = np.array([0, 5, 0, 0, 17, 1, 0, 8, 0, 0, 0, 33, 0, 0, 2, 0])
    x = jnp.asarray(rng.standard_normal((sizes.sum() + 6, TINY.hidden_size)), jnp.float32)
    p = moe_params
    got = grouped_swiglu(x, _view(p), jnp.asarray(sizes), tile_m=8)

    def reference(sizes):
        want, start = [], 0
        for e, n in enumerate(sizes):
            rows = x[start:start + n]
            want.append((jax.nn.silu(rows @ p.we1[e]) * (rows @ p.we3[e])) @ p.we2[e])
            start += n
        return jnp.concatenate(want + [jnp.zeros((x.shape[0] - start, x.shape[1]))])
    np.testing.assert_allclose(got, reference(sizes), atol=OP_ATOL["float32"], rtol=1e-5)
    wrong = sizes.copy()
    wrong[4], wrong[5] = 16, 2
    assert not np.allclose(got, reference(wrong), atol=OP_ATOL["float32"], rtol=1e-5)


def test_moe_layer_plans_agree(moe_params):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, TINY.hidden_size)), jnp.float32)
    ref, _ = moe(moe_params, x, TINY, ExecutionPlan(experts="dense"), "prefill")
    for impl in ("gather", "grouped", "pallas"):
        got, stats = moe(moe_params, x, TINY, ExecutionPlan(experts=impl), "prefill")
        assert stats is None
        np.testing.assert_allclose(got, ref, atol=OP_ATOL["float32"], rtol=1e-5, err_msg=impl)


def test_differentiable_grouped_path_matches_reference_and_its_gradients(moe_params):
    x = jnp.asarray(np.random.default_rng(4).standard_normal((23, TINY.hidden_size)), jnp.float32)
    w, idx, _ = route(moe_params, x, TINY)

    def loss(p, fn, **kw):
        return jnp.sum(jnp.sin(fn(x, w, idx, _view(p), **kw)))

    np.testing.assert_allclose(experts_grouped(x, w, idx, _view(moe_params), differentiable=True),
                               experts_dense(x, w, idx, _view(moe_params)), atol=OP_ATOL["float32"], rtol=1e-5)
    g = jax.grad(loss)(moe_params, experts_grouped, differentiable=True)
    g_ref = jax.grad(loss)(moe_params, experts_dense)
    for name in ("we1", "we3", "we2"):
        np.testing.assert_allclose(getattr(g, name), getattr(g_ref, name), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("offset", [0, 1])
def test_layer_indexed_expert_stacks_match_sliced(offset):
    """Inside the layer scan the expert stacks stay whole [L, E, ...] and are indexed by layer; the twin that
    reads the layer after (an off-by-one expert offset) must differ."""
    stack = random_params(TINY, seed=9).moe_layers.ffn  # [L, ...]
    layer = 0
    one = jax.tree.map(lambda a: a[layer], stack)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((7, TINY.hidden_size)), jnp.float32)
    w, idx, _ = route(one, x, TINY)
    ref = experts_dense(x, w, idx, _view(one))
    view = expert_view(stack.we1, stack.we3, stack.we2, jnp.int32(layer + offset))
    for fn in (experts_gather, experts_grouped, experts_dense, experts_pallas):
        err = float(jnp.max(jnp.abs(fn(x, w, idx, view) - ref)) / jnp.max(jnp.abs(ref)))
        assert (err < 1e-5) if offset == 0 else (err > 1e-2), (fn.__name__, err)
