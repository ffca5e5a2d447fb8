import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import TINY, ExecutionPlan
from model.cache import Cache
from model.mla import attend_absorbed, attend_naive, causal_mask, project
from tests.helpers import random_params
from tests.tolerances import rel_err

PLAN = ExecutionPlan()


@pytest.fixture(scope="module")
def setup():
    p = jax.tree.map(lambda a: a[0], random_params(TINY, seed=5).moe_layers.attn)
    b, t = 2, 300  # past the original context (128): YaRN's scaled frequencies matter
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, t, TINY.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    q_nope, q_pe, c_kv, k_pe = project(p, x, pos, TINY)
    naive = attend_naive(p, q_nope, q_pe, c_kv, k_pe, causal_mask(t), TINY, PLAN)
    return p, pos, (q_nope, q_pe, Cache(c_kv=c_kv, k_pe=k_pe, lengths=pos[:, -1] + 1)), naive


def test_absorbed_equals_naive(setup):
    p, pos, (q_nope, q_pe, cache), naive = setup
    assert rel_err(attend_absorbed(p, q_nope, q_pe, cache, pos, TINY, PLAN), naive) < 1e-5


@pytest.mark.parametrize("twin", ["scale", "mask_offset"])
def test_absorbed_twins_fail(setup, twin):
    p, pos, (q_nope, q_pe, cache), naive = setup
    cfg = TINY
    if twin == "scale":  # the softmax scale without YaRN's mscale^2
        cfg = TINY.replace(rope_scaling=dataclasses.replace(TINY.rope_scaling, mscale_all_dim=0.0))
        assert cfg.softmax_scale != TINY.softmax_scale
    wrong = attend_absorbed(p, q_nope, q_pe, cache, pos - 1 if twin == "mask_offset" else pos, cfg, PLAN)
    assert rel_err(wrong, naive) > 1e-3
