import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import TINY
from model.mla import attend_absorbed, attend_naive, cache_mask, causal_mask, project
from tests.helpers import random_params
from tests.tolerances import rel_err


@pytest.fixture(scope="module")
def setup():
    p = jax.tree.map(lambda a: a[0], random_params(TINY, seed=5).moe_layers.attn)
    b, t = 2, 300  # past the original context (128): YaRN's scaled frequencies matter
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, t, TINY.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return p, x, pos


def test_absorbed_equals_naive(setup):
    p, x, pos = setup
    q_nope, q_pe, c_kv, k_pe = project(p, x, pos, TINY)
    naive = attend_naive(p, q_nope, q_pe, c_kv, k_pe, causal_mask(x.shape[1]), TINY.softmax_scale)
    absorbed = attend_absorbed(p, q_nope, q_pe, c_kv, k_pe, cache_mask(pos, x.shape[1]), TINY.softmax_scale)
    assert rel_err(absorbed, naive) < 1e-5


@pytest.mark.parametrize("twin", ["scale", "mask_offset"])
def test_absorbed_twins_fail(setup, twin):
    p, x, pos = setup
    q_nope, q_pe, c_kv, k_pe = project(p, x, pos, TINY)
    naive = attend_naive(p, q_nope, q_pe, c_kv, k_pe, causal_mask(x.shape[1]), TINY.softmax_scale)
    scale = TINY.qk_head_dim ** -0.5 if twin == "scale" else TINY.softmax_scale  # scale without YaRN's mscale^2
    mask = cache_mask(pos - 1 if twin == "mask_offset" else pos, x.shape[1])
    wrong = attend_absorbed(p, q_nope, q_pe, c_kv, k_pe, mask, scale)
    assert rel_err(wrong, naive) > 1e-3
