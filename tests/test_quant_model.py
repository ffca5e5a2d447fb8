"""Quantized models: every recipe runs prefill and decode (unsharded and sharded) with logits close to the
unquantized model, within a tolerance derived from the format's own error; calibration; the FP8 latent cache;
orbax round trip of a quantized parameter tree."""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import fresh_jit_caches

from model import calibrate, decode_step, init_cache, prefill, quantize_params, shard_cache, shard_params
from model.io.checkpoint import load_checkpoint
from model.io.tokenizer import ByteTokenizer
from model.train.data import problems, stdlib_corpus
from quant import RECIPES, get_recipe, weight_bytes
from quant import formats as F
from quant.qarray import QArray

BUNDLED = Path(__file__).resolve().parents[1] / "model" / "bundled" / "checkpoint"
# relative error of one quantize-dequantize on Gaussian data, 10^(-SQNR/20): FP8 31.5 dB, NVFP4 20.4, MXFP4 18.8
FORMAT_REL_ERR = {"fp8": 0.027, "nvfp4": 0.095, "mxfp4": 0.115}


def tolerance(recipe) -> float:
    """Relative RMS error allowed on the logits: twice the format's error, times sqrt(2) when activations are
    quantized too (two independent errors per matmul)."""
    rules = [rule for _, rule in get_recipe(recipe).rules if rule.fmt is not None]
    return 2 * max(FORMAT_REL_ERR[x.fmt] for x in rules) * (np.sqrt(2) if any(x.act for x in rules) else 1.0)


@pytest.fixture(scope="module")
def model():
    params, cfg, _ = load_checkpoint(BUNDLED)
    tok = ByteTokenizer(cfg.vocab_size)
    corpus = stdlib_corpus()
    calib_seqs = ([tok.encode(corpus.train[i * 7919:i * 7919 + 95], add_bos=True) for i in range(4)]
                  + [tok.encode(p.text(), add_bos=True) for p in problems(np.random.default_rng(5), 4, heldout=False)])
    calib = calibrate(params, cfg, calib_seqs)
    texts = [corpus.heldout[1000:1060], problems(np.random.default_rng(7), 1, heldout=True)[0].text()[:48]]
    ids = [tok.encode(t, add_bos=True) for t in texts]
    tokens = np.zeros((2, max(map(len, ids))), np.int32)
    for i, s in enumerate(ids):
        tokens[i, :len(s)] = s
    return params, cfg, calib, tokens, np.array([len(s) for s in ids])


def run(params, cfg, tokens, lengths, kv_scale=None, mesh=None):
    """Prefill logits at every real position, then 3 decode steps: [positions, V]."""
    cache = init_cache(cfg, 2, tokens.shape[1] + 4, kv_scale=kv_scale)
    if mesh is not None:
        params, cache = shard_params(params, cfg, mesh), shard_cache(cache, mesh)
    logits, cache = prefill(params, cache, tokens, lengths, cfg=cfg, all_logits=True, mesh=mesh)
    rows = [np.asarray(logits)[b, :lengths[b]] for b in range(2)]
    for i in range(3):
        step, cache = decode_step(params, cache, tokens[:, i], cfg=cfg, mesh=mesh)
        rows.append(np.asarray(step))
    return np.concatenate(rows)


def rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


# every recipe of the registry but those that only recombine what another row checks: nvfp4_w4a4 is r1_fp4 without
# its FP8 cache, mxfp4_w4a16 is mxfp4_w4a4's weights; nvfp4_search's scale search is checked against amax scaling in
# tests/test_quant_formats.py
CLOSE = [n for n in RECIPES if n not in ("bf16", "nvfp4_w4a4", "mxfp4_w4a16", "nvfp4_search")] + ["nvfp4_w4a4+attn"]


@pytest.mark.parametrize("name", CLOSE)
def test_recipe_close_to_unquantized(model, name):
    params, cfg, calib, tokens, lengths = model
    r = get_recipe(name)
    ref = run(params, cfg, tokens, lengths)
    qp = quantize_params(params, cfg, name, calib)
    err = rel_rms(run(qp, cfg, tokens, lengths, calib.kv if r.kv_fp8 else None), ref)
    assert 1e-4 < err < tolerance(name), (name, err, tolerance(name))  # quantized (not a no-op), and close
    assert weight_bytes(qp) < weight_bytes(params)


def test_wrong_nibble_order_fails(model, monkeypatch):
    """The twin: reading the packed codes with the nibbles swapped must break the tolerance."""
    params, cfg, calib, tokens, lengths = model
    ref = run(params, cfg, tokens, lengths)
    qp = quantize_params(params, cfg, "nvfp4_w4a16", calib)
    def swapped(p):
        return jnp.stack([p >> 4, p & 15], -1).reshape(*p.shape[:-1], -1)
    monkeypatch.setattr(F, "unpack_nibbles", swapped)
    fresh_jit_caches()
    err = rel_rms(run(qp, cfg, tokens, lengths), ref)
    monkeypatch.undo()
    fresh_jit_caches()
    assert err > tolerance("nvfp4_w4a16"), err


def test_recipe_structure(model):
    """r1_fp4 quantizes exactly the published linears: MLPs and experts; attention, head, embedding, router, MTP
    untouched; gate and up share one tensor scale per matrix."""
    params, cfg, calib, _, _ = model
    q = quantize_params(params, cfg, "r1_fp4", calib)
    moe, dense = q.moe_layers.ffn, q.dense_layers.ffn
    for w in (moe.we1, moe.we3, moe.we2, moe.shared.w1, moe.shared.w2, dense.w1, dense.w3, dense.w2):
        assert isinstance(w, QArray) and w.fmt == "nvfp4" and w.act == "nvfp4" and w.input_scale is not None
    np.testing.assert_array_equal(np.asarray(moe.we1.tensor_scale), np.asarray(moe.we3.tensor_scale))
    np.testing.assert_array_equal(np.asarray(moe.we1.input_scale), np.asarray(moe.we3.input_scale))
    assert moe.we1.tensor_scale.shape == (cfg.num_hidden_layers - cfg.first_k_dense_replace, cfg.n_routed_experts)
    untouched = [q.embed, q.lm_head, moe.w_router, moe.e_bias, *jax.tree.leaves(q.moe_layers.attn),
                 *jax.tree.leaves(q.mtp)]
    assert not any(isinstance(x, QArray) for x in untouched)
    assert get_recipe("r1_fp4").kv_fp8
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nvfp3")
    with pytest.raises(ValueError, match="modifier"):
        get_recipe("r1_fp4+bogus")


def test_calibration_covers_observed_activations(model):
    _, cfg, calib, _, _ = model
    amax = calib.amax
    assert amax[".moe_layers.ffn.we1"].shape == (cfg.num_hidden_layers - 1, cfg.n_routed_experts)
    assert (amax[".moe_layers.ffn.we1"] > 0).all() and (amax[".moe_layers.attn.wo"] > 0).all()
    assert ".moe_layers.ffn.we3" not in amax  # up reads gate's input: one probe, one scale
    np.testing.assert_allclose(np.asarray(calib.inputs[".moe_layers.ffn.we1"]),
                               2 * amax[".moe_layers.ffn.we1"] / (6 * 448), rtol=1e-6)  # 2x margin
    assert calib.kv.shape == (cfg.num_hidden_layers, 2)


def test_fp8_cache_holds_e4m3(model):
    """Two E4M3 codes per 16-bit word: half the bytes of a 16-bit cache, and each code the scaled latent rounded."""
    from model.cache import kv_load
    from quant.formats import div, e4m3, unpack_bytes
    params, cfg, calib, tokens, lengths = model
    cache = init_cache(cfg, 2, tokens.shape[1] + 4, kv_scale=calib.kv)
    _, cache = prefill(params, cache, tokens, lengths, cfg=cfg)
    assert cache.c_kv.dtype == np.dtype("uint16") and cache.kv_scale is not None
    assert cache.c_kv.nbytes * 2 == init_cache(cfg, 2, tokens.shape[1] + 4, dtype=np.float16).c_kv.nbytes
    _, plain = prefill(params, init_cache(cfg, 2, tokens.shape[1] + 4), tokens, lengths, cfg=cfg)
    scale = calib.kv[:, 0][:, None, None, None]
    want = np.asarray(e4m3(div(plain.c_kv, scale))).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(unpack_bytes(cache.c_kv)).view(np.uint8), want)
    layer = 1  # what a layer's decode reads back
    codes = want[layer].view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(kv_load(cache.c_kv[layer], calib.kv[layer], 0, np.float32)),
                                  codes * float(calib.kv[layer, 0]))


# quantized on the host, then placed. One case per way of storing and computing: NVFP4 with quantized activations
# and an FP8 cache over experts and tensor (r1_fp4; nvfp4_w4a16, nvfp4_w4a4 and nvfp4_search place the same
# arrays), FP8 blocks, MXFP4 (mxfp4_w4a4 places the same), FP8 and NVFP4 side by side (nvfp4_experts), and the FP8
# cache split over data
@pytest.mark.parametrize("mesh_spec,name", [("expert=4,tensor=2", "r1_fp4"), ("data=2,expert=4", "fp8_w8a8+kv_fp8")]
                         + [("expert=8", n) for n in ("fp8_w8a8", "mxfp4_w4a16", "nvfp4_experts")])
def test_sharded_quantized_equals_unsharded(model, mesh_spec, name):
    """Weight-only recipes: the same dequantized weights, only the summation order differs (1e-4). Quantized
    activations or cache are step functions of their input: a float-reorder difference can move a value across a
    rounding boundary and change one code, so those recipes get 5% of their quantization tolerance instead."""
    from sharding import make_mesh
    params, cfg, calib, tokens, lengths = model
    r = get_recipe(name)
    qp = quantize_params(params, cfg, name, calib)
    kv = calib.kv if r.kv_fp8 else None
    single = run(qp, cfg, tokens, lengths, kv)
    sharded = run(qp, cfg, tokens, lengths, kv, mesh=make_mesh(mesh_spec))
    tol = 0.05 * tolerance(name) if (any(x.act for _, x in r.rules) or r.kv_fp8) else 1e-4
    assert rel_rms(sharded, single) < tol, (rel_rms(sharded, single), tol)


def test_shard_errors_name_the_block_constraint(model):
    from sharding import make_mesh
    params, cfg, calib, _, _ = model
    qp = quantize_params(params, cfg, "mxfp4_w4a16", calib)  # expert width 96 = 3 blocks of 32: not splittable by 2
    with pytest.raises(ValueError, match="whole scale blocks"):
        shard_params(qp, cfg, make_mesh("expert=4,tensor=2"))
    fp8 = quantize_params(params, cfg, "fp8_w8a8", calib)
    with pytest.raises(ValueError, match="128"):
        shard_params(fp8, cfg, make_mesh("expert=4,tensor=2"))


def test_quantized_tree_orbax_roundtrip(model, tmp_path):
    import orbax.checkpoint as ocp
    params, cfg, calib, _, _ = model
    qp = quantize_params(params, cfg, "r1_fp4", calib)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "q", qp)
    ckptr.wait_until_finished()
    back = ckptr.restore(tmp_path / "q", jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), qp))
    assert jax.tree.structure(back) == jax.tree.structure(qp)
    for a, b in zip(jax.tree.leaves(qp), jax.tree.leaves(back)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
