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


@pytest.mark.parametrize("shift", [0, 1])
def test_absorbed_with_new_tokens_equals_written_cache(setup, shift):
    """Decode's order (model/forward.py): the cache holding slots before the step plus the step's own latents as
    `new` keys, seen causally among themselves, equals attending to the cache with them written in. The twin that
    gives the first new query the next token's latents as its own must differ."""
    p, x, pos = setup
    q_nope, q_pe, c_kv, k_pe = project(p, x, pos, TINY)
    s, t = x.shape[1], 3
    start = s - t  # the last t tokens are this step's
    want = attend_absorbed(p, q_nope[:, start:], q_pe[:, start:], c_kv, k_pe, cache_mask(pos[:, start:], s),
                           TINY.softmax_scale)
    old = jnp.broadcast_to(jnp.arange(s)[None, None, :] < start, (x.shape[0], t, s))
    c_old, r_old = c_kv.at[:, start:].set(7.0), k_pe.at[:, start:].set(7.0)  # slots the step has not written yet
    got = attend_absorbed(p, q_nope[:, start:], q_pe[:, start:], c_old, r_old, old, TINY.softmax_scale,
                          new=(c_kv[:, start:], k_pe[:, start:]))
    if shift == 0:
        assert rel_err(got, want) < 1e-5
    else:
        sees_next = attend_absorbed(p, q_nope[:, start:start + 1], q_pe[:, start:start + 1], c_old, r_old,
                                    old[:, :1], TINY.softmax_scale, new=(c_kv[:, start + 1:start + 2],
                                                                          k_pe[:, start + 1:start + 2]))
        assert rel_err(sees_next, want[:, :1]) > 1e-3
