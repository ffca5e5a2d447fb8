"""Tensor-parallel inference of the unstacked layout (sharding/tp.py): each device holds a slice of every head,
expert width and the vocabulary, and the prefill and decode logits equal one device's, plain and quantized."""

from unittest import mock

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model import TINY, generate, init_cache, prefill
from model.config import get_preset
from model.forward import decode_fn
from model.layout import unstack_layers
from model.params import OutMajorMlp, Transposed, init
from quant import quantize_params
from quant.calibrate import calibrate
from sharding import tp
from sharding.mesh import make_mesh
from sharding.tp import shard_unstacked, tensor_parallel, unstacked_specs
from tests.helpers import random_params, teacher_forced_logits

CFG = TINY
SPLIT_MIN_BYTES = tp.SPLIT_MIN_BYTES  # the library's threshold, before the fixture below lowers it


@pytest.fixture(autouse=True)
def split_down_projections(monkeypatch):
    """tiny's down-projections are too small to split by default (SPLIT_MIN_BYTES): split them anyway, so every
    test here runs that path too."""
    monkeypatch.setattr(tp, "SPLIT_MIN_BYTES", 0)


def _mesh(n):
    return make_mesh(f"tensor={n}", devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def batch():
    """Two prompts of different lengths (right-padded to 10)."""
    tokens = np.random.default_rng(1).integers(2, CFG.vocab_size, size=(2, 10)).astype(np.int32)
    return tokens, np.array([10, 6], np.int32)


@pytest.mark.parametrize("n, recipe, per_layer", [(2, None, True), (4, None, False), (2, "nvfp4_w4a16", True),
                                                   (2, "nvfp4_w4a4+attn", True)])
def test_tensor_parallel_equals_one_device(batch, n, recipe, per_layer):
    """W4A4 with calibrated (static) activation scales: each device's slice of an activation is scaled as the
    whole is. The cache: one buffer per layer, or the stacked [L, ...] one."""
    params = random_params(CFG, seed=3)
    if recipe is not None:
        tokens, lengths = batch
        calib = calibrate(params, CFG, [list(t[:m]) for t, m in zip(tokens, lengths)]) if "a4" in recipe else None
        params = quantize_params(params, recipe, calib)
    want = teacher_forced_logits(params, CFG, *batch)
    mesh = _mesh(n)
    sharded = shard_unstacked(unstack_layers(params), CFG, mesh)
    attn = sharded.moe_layers[0].attn
    if recipe is None:  # each device holds its heads only, and its columns of the down-projections
        assert attn.wo.sharding.shard_shape(attn.wo.shape) == (CFG.num_attention_heads // n, *attn.wo.shape[1:])
        assert attn.wq_a.sharding.shard_shape(attn.wq_a.shape) == (CFG.hidden_size, CFG.q_lora_rank // n)
    elif "attn" in recipe:  # NVFP4 codes [Q, D/2] split by their rows: whole 16-blocks along D
        assert attn.wkv_a.codes.sharding.shard_shape(attn.wkv_a.codes.shape)[0] == attn.wkv_a.codes.shape[0] // n
    got = teacher_forced_logits(sharded, CFG, *batch, mesh=mesh, per_layer=per_layer)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_tensor_parallel_without_the_reductions_differs(batch):
    """The equality above bites: the same shards without the per-layer psums give other logits."""
    params = unstack_layers(random_params(CFG, seed=3))
    mesh = _mesh(2)
    sharded = shard_unstacked(params, CFG, mesh)
    tokens, lengths = batch
    cache = init_cache(CFG, 2, 14)
    _, cache = prefill(sharded, cache, tokens, lengths, cfg=CFG, mesh=mesh)
    right, _ = jax.jit(lambda p, c, t: decode_fn(p, c, t, CFG, mesh=mesh))(sharded, cache, tokens[:, 0])
    def no_psum(p, c, t, tp_axis):  # the down-projections' all-gather stays, the layers' psums become identities
        with mock.patch.object(jax.lax, "psum", lambda x, axis: x):
            return decode_fn(p, c, t, CFG, tp_axis=tp_axis)
    wrong, _ = jax.jit(lambda p, c, t: tensor_parallel(no_psum, p, c, t, cfg=CFG, mesh=mesh))(
        sharded, cache, tokens[:, 0])
    assert np.abs(np.asarray(wrong) - np.asarray(right)).max() > 1e-2


def test_tensor_parallel_generates_the_same_tokens():
    params = random_params(CFG, seed=4)
    prompts = [[5, 9, 13, 2], [7, 7]]
    mesh = _mesh(2)
    a = generate(params, CFG, prompts, max_new_tokens=6).sequences()
    b = generate(shard_unstacked(unstack_layers(params), CFG, mesh), CFG, prompts, max_new_tokens=6,
                 mesh=mesh).sequences()
    assert a == b


def test_specs_split_heads_widths_and_vocabulary():
    params = random_params(CFG, seed=4)
    flat = unstack_layers(params)
    s = unstacked_specs(flat, CFG)
    layer = s.moe_layers[0]
    assert layer.attn.wo == P("tensor", None, None) and layer.attn.wkv_a == P(None, None)
    # plain SwiGLU weights are stored output-major (OutMajorMlp: w13 [2, F, D], w2t [D, F]), the head [V, D]
    width = OutMajorMlp(w13=P(None, "tensor", None), w2t=P(None, "tensor"))
    assert layer.ffn.we1[0] == width and layer.ffn.we1[-1] == width and layer.ffn.we3 is None
    assert layer.ffn.shared == width and s.dense_layers[0].ffn == width
    assert s.lm_head == Transposed(P(("expert", "tensor"), None)) and s.embed == P()
    q = unstacked_specs(unstack_layers(quantize_params(params, "nvfp4_w4a16")), CFG).moe_layers[0].ffn
    assert q.we1[0] == P(None, "tensor") and q.we2[-1] == P("tensor", None)
    assert s.moe_layers[0].ffn.w_router == P(None, None)  # every device routes the whole x alike
    # with the mesh: the down-projections by columns where the slices are whole
    for n in (2, 4):
        a = unstacked_specs(flat, CFG, mesh=_mesh(n)).dense_layers[0].attn
        assert a.wq_a == P(None, "tensor") and a.wkv_a == P(None, "tensor")
    # q_lora_rank 32 and C+R 40 do not split 3 ways; an FP8 weight keeps them whole: 16 columns per device are
    # not whole 128 x 128 tiles
    a = unstacked_specs(flat, CFG, mesh=make_mesh("tensor=3", devices=jax.devices()[:3])).moe_layers[0].attn
    assert a.wq_a == P(None, None) and a.wkv_a == P(None, None)
    fp8 = unstack_layers(quantize_params(params, "fp8_w8a8"))
    a = unstacked_specs(fp8, CFG, mesh=_mesh(2)).moe_layers[0].attn
    assert a.wq_a == P(None, None) and a.wkv_a == P(None, None) and a.wo == P("tensor", None, None)


def test_down_projections_split_only_when_it_pays(monkeypatch):
    """By default tiny's down-projections (18 KB) stay whole and small's (2.8 MB a layer) split; a split one costs
    the decode step one all-gather per layer, on top of the logits' one."""
    mesh = _mesh(2)
    small = get_preset("small")
    shapes = jax.eval_shape(lambda: unstack_layers(init(small, jax.random.key(0))))
    params = unstack_layers(random_params(CFG, seed=4))
    cache = init_cache(CFG, 1, 8)
    gathers = {}
    for threshold in (SPLIT_MIN_BYTES, 0):
        monkeypatch.setattr(tp, "SPLIT_MIN_BYTES", threshold)
        a = unstacked_specs(params, CFG, mesh=mesh).moe_layers[0].attn
        b = unstacked_specs(shapes, small, mesh=mesh).moe_layers[0].attn
        assert b.wq_a == P(None, "tensor") and b.wkv_a == P(None, "tensor")
        whole = threshold > 0
        assert (a.wq_a, a.wkv_a) == ((P(None, None),) * 2 if whole else (P(None, "tensor"),) * 2)
        sharded = shard_unstacked(params, CFG, mesh)
        text = jax.jit(lambda p, c, t: decode_fn(p, c, t, CFG, mesh=mesh)).lower(
            sharded, cache, np.zeros(1, np.int32)).as_text()
        gathers[whole] = text.count("stablehlo.all_gather")
    assert gathers == {True: 1, False: 1 + CFG.num_hidden_layers}


def test_tensor_parallel_errors():
    params = random_params(CFG, seed=4)
    flat = unstack_layers(params)
    with pytest.raises(ValueError, match="tensor-parallel only"):
        shard_unstacked(flat, CFG, make_mesh("expert=2", devices=jax.devices()[:2]))
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible"):
        shard_unstacked(flat, CFG, _mesh(8))
    with pytest.raises(ValueError, match="unstacked layout"):
        shard_unstacked(params, CFG, _mesh(2))
    # tiny's expert width 32 splits into 16-wide halves: whole NVFP4 blocks, but not whole 128 x 128 FP8 tiles
    with pytest.raises(ValueError, match="FP8 128x128 tiles cannot be split"):
        shard_unstacked(unstack_layers(quantize_params(params, "fp8_w8a8")), CFG, _mesh(2))
