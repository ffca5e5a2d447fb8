"""The unstacked layout (one buffer per layer and per routed expert, model/layout.py) computes what the stacked one
does: same prefill and decode logits, plain and quantized, and the lax.switch experts equal the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import TINY, generate, init_cache, prefill
from model.cache import to_per_layer, to_stacked
from model.layout import is_unstacked, unstack_layers
from model.moe import experts_dense_reference, experts_switch, route
from model.params import OutMajorMlp, Transposed
from quant import quantize_params
from quant.calibrate import calibrate
from tests.helpers import random_params, teacher_forced_logits

CFG = TINY


def _run(params, tokens, lengths, per_layer=None):
    """Unstacked params run with a per-layer cache unless told otherwise."""
    per_layer = is_unstacked(params) if per_layer is None else per_layer
    return teacher_forced_logits(params, CFG, tokens, lengths, per_layer=per_layer)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.integers(2, CFG.vocab_size, size=(2, 12)).astype(np.int32), np.array([12, 7], np.int32)


@pytest.mark.parametrize("recipe", [None, "nvfp4_w4a16", "nvfp4_w4a4"])
def test_unstacked_equals_stacked(batch, recipe):
    """W4A4 with calibrated (static) activation scales, per expert: the same in both layouts."""
    params = random_params(CFG, seed=3)
    if recipe is not None:
        calib = calibrate(params, CFG, [list(batch[0][0]), list(batch[0][1][:7])]) if "a4" in recipe else None
        params = quantize_params(params, recipe, calib)
    flat = unstack_layers(params)
    assert is_unstacked(flat) and len(flat.moe_layers) == CFG.n_moe_layers
    f = flat.moe_layers[0].ffn
    assert len(f.we1) == CFG.n_routed_experts
    want, got = _run(params, *batch), _run(flat, *batch)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_unstacked_with_a_stacked_cache(batch):
    """Unstacked params also take the library's [L, ...] cache, with the same logits."""
    params = random_params(CFG, seed=3)
    want, got = _run(params, *batch), _run(unstack_layers(params), *batch, per_layer=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_per_layer_cache_round_trip_and_refusal():
    cache = init_cache(CFG, 2, 16)
    cache = cache.replace(c_kv=jax.random.normal(jax.random.key(0), cache.c_kv.shape))
    per = to_per_layer(cache)
    assert per.per_layer and len(per.c_kv) == CFG.num_hidden_layers and per.c_kv[1].shape == (2, 16, CFG.kv_lora_rank)
    assert (per.batch, per.max_len) == (cache.batch, cache.max_len) == (2, 16)
    np.testing.assert_array_equal(np.asarray(to_stacked(per).c_kv), np.asarray(cache.c_kv))
    assert jax.tree.structure(init_cache(CFG, 2, 16, per_layer=True)) == jax.tree.structure(per)
    with pytest.raises(ValueError, match="per-layer cache goes with unstacked weights"):
        prefill(random_params(CFG, seed=3), per, np.full((2, 4), 5, np.int32), np.array([4, 2]), cfg=CFG)


def test_unstacked_with_experts_out_of_order_differs(batch):
    """The equality above bites: the same buffers with two experts swapped give other logits."""
    flat = unstack_layers(random_params(CFG, seed=3))
    f = flat.moe_layers[0].ffn
    swap = lambda t: (t[1], t[0], *t[2:])  # noqa: E731
    wrong = flat.replace(moe_layers=(flat.moe_layers[0].replace(ffn=f.replace(we1=swap(f.we1))),
                                     *flat.moe_layers[1:]))
    assert np.abs(_run(wrong, *batch) - _run(flat, *batch)).max() > 1e-3


def test_plain_weights_stored_output_major(batch):
    """Plain SwiGLU weights (routed, shared, dense) become OutMajorMlp [2, F, D] / [D, F] holding exactly the
    stacked weights, and the LM head [V, D]; quantized ones keep their own layout. Gate and up swapped inside
    w13, or the head's [D, V] buffer taken as [V, D] without the transpose, change the logits."""
    params = random_params(CFG, seed=3)
    flat = unstack_layers(params)
    f, stack = flat.moe_layers[1].ffn, params.moe_layers.ffn
    assert f.we3 is None and f.we2 is None and all(isinstance(m, OutMajorMlp) for m in f.we1)
    np.testing.assert_array_equal(np.asarray(f.we1[5].w13[0]), np.asarray(stack.we1[1, 5]).T)
    np.testing.assert_array_equal(np.asarray(f.we1[5].w13[1]), np.asarray(stack.we3[1, 5]).T)
    np.testing.assert_array_equal(np.asarray(f.we1[5].w2t), np.asarray(stack.we2[1, 5]).T)
    np.testing.assert_array_equal(np.asarray(f.shared.w13[1]), np.asarray(stack.shared.w3[1]).T)
    dense = flat.dense_layers[0].ffn
    assert isinstance(dense, OutMajorMlp) and dense.w13.shape == (2, CFG.intermediate_size, CFG.hidden_size)
    np.testing.assert_array_equal(np.asarray(flat.lm_head.t), np.asarray(params.lm_head).T)
    q = unstack_layers(quantize_params(params, "nvfp4_w4a16"))
    assert isinstance(q.moe_layers[0].ffn.we3, tuple) and not isinstance(q.dense_layers[0].ffn, OutMajorMlp)

    want = _run(flat, *batch)
    swapped = f.replace(we1=tuple(m.replace(w13=m.w13[::-1]) for m in f.we1))
    wrong = flat.replace(moe_layers=(flat.moe_layers[0], flat.moe_layers[1].replace(ffn=swapped)))
    assert np.abs(_run(wrong, *batch) - want).max() > 1e-3
    dense_swapped = flat.replace(dense_layers=(flat.dense_layers[0].replace(ffn=dense.replace(w13=dense.w13[::-1])),))
    assert np.abs(_run(dense_swapped, *batch) - want).max() > 1e-3
    untransposed = flat.replace(lm_head=Transposed(params.lm_head.reshape(flat.lm_head.t.shape)))
    assert np.abs(_run(untransposed, *batch) - want).max() > 1e-3


def test_switch_experts_equal_dense_reference():
    p = random_params(CFG, seed=5).moe_layers.ffn
    layer0 = jax.tree.map(lambda a: a[0], p)
    x = jax.random.normal(jax.random.key(1), (6, CFG.hidden_size))
    w, idx = route(layer0, x, CFG)
    want = experts_dense_reference(layer0, x, w, idx)
    flat = unstack_layers(random_params(CFG, seed=5)).moe_layers[0].ffn
    got = experts_switch(flat, x, w, idx)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_unstacked_generates_the_same_tokens():
    params = random_params(CFG, seed=4)
    prompts = [[5, 9, 13, 2], [7, 7]]
    a = generate(params, CFG, prompts, max_new_tokens=6).sequences()
    b = generate(unstack_layers(params), CFG, prompts, max_new_tokens=6).sequences()
    assert a == b


def test_unstacked_refuses_mesh_and_pallas():
    flat = unstack_layers(random_params(CFG, seed=4))
    with pytest.raises(ValueError, match="xla backend"):
        generate(flat, CFG, [[5, 9]], max_new_tokens=1, backend="pallas")
    x = jnp.zeros((1, 2, CFG.hidden_size))
    from model.moe import moe
    with pytest.raises(ValueError, match="one device"):
        moe(flat.moe_layers[0].ffn, x, CFG, impl="pallas")
