"""Pallas kernels: interpret-mode equivalence with their plain-jnp references on random inputs and edge cases,
every output element written (interpret mode fills unwritten outputs with NaN: the poison), clear errors for
unsupported shapes, and lowering for CUDA at DeepSeek's sizes with the default block sizes on this CPU-only
machine. The Hopper-specific properties (dot operand dtypes, no exp2, offsets, shared memory, when to split the
sequence) are in tests/test_pallas_target.py.

Tolerances: float32 inputs 1e-5 relative to the output's scale (reordered f32 sums); bf16 inputs 2e-2 (bf16
products, f32 accumulation); quantized weights are dequantized exactly, so they get the float32 tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.common import lower_for_cuda
from pallas_kernels.grouped_matmul import BlockSizes as GmmBlocks
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference
from pallas_kernels.mla_decode import BlockSizes as DecodeBlocks
from pallas_kernels.mla_decode import mla_decode, mla_decode_reference
from pallas_kernels.mla_prefill import BlockSizes as PrefillBlocks
from pallas_kernels.mla_prefill import mla_prefill, mla_prefill_reference
from quant.formats import pack_bytes
from quant.qarray import quantize

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SMALL_GMM = GmmBlocks(bm=16, bn=16, bk=32)


def _rand(rng, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(got).any(), "an output element was never written (NaN poison)"
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err <= TOL[dtype], err


def test_interpret_mode_poisons_unwritten_outputs():
    """The premise of the NaN checks: a kernel that skips a block leaves NaN there."""
    def k(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]
    y = pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct((4, 8), jnp.float32), grid=(2,),
                       in_specs=[pl.BlockSpec((2, 8), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((2, 8), lambda i: (i, 0)), interpret=True)(jnp.ones((4, 8)))
    assert np.isnan(np.asarray(y)[2:]).all()


@pytest.mark.parametrize("sizes", [[5, 0, 37, 20], [0, 0, 64, 0], [1, 1, 1, 1], [16, 16, 16, 16]])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_matmul_matches_reference(sizes, dtype):
    rng = np.random.default_rng(sum(sizes))
    g, k, n = len(sizes), 64, 32
    m = sum(sizes) + 3  # rows past the groups' sum come back as zeros
    x, w = _rand(rng, (m, k), dtype), _rand(rng, (g, k, n), dtype, 0.2)
    gs = jnp.array(sizes, jnp.int32)
    y = grouped_matmul(x, w, gs, block_sizes=SMALL_GMM, interpret=True)
    _close(y, grouped_matmul_reference(x, w, gs), dtype)
    assert np.all(np.asarray(y[sum(sizes):]) == 0)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_grouped_matmul_fp4_dequantizes_in_kernel(fmt):
    rng = np.random.default_rng(3)
    g, k, n, sizes = 3, 64, 32, [9, 0, 30]
    x = _rand(rng, (sum(sizes), k))
    w1, w3 = (quantize(_rand(rng, (g, k, n), scale=0.1), fmt, k_axis=-2, batch_ndim=1) for _ in range(2))
    gs = jnp.array(sizes, jnp.int32)
    _close(grouped_matmul(x, w1, gs, block_sizes=SMALL_GMM, interpret=True),
           grouped_matmul_reference(x, w1, gs), jnp.float32)
    _close(grouped_matmul(x, w1, gs, w3, block_sizes=SMALL_GMM, interpret=True),  # fused gate/up SwiGLU
           grouped_matmul_reference(x, w1, gs, w3), jnp.float32)


def test_grouped_matmul_fp8_tiles_and_the_last_experts():
    """FP8 codes (two per 16-bit word) with 128 x 128 scale tiles; every row routed to the last experts of a
    stack read through an expert offset, as the model reads one layer's experts inside [L * E, ...] stacks."""
    rng = np.random.default_rng(4)
    g, k, n = 6, 256, 128
    w = quantize(_rand(rng, (g, k, n), scale=0.1), "fp8", k_axis=-2, batch_ndim=1)
    assert w.codes.dtype == jnp.uint16 and w.codes.shape == (g, n, k // 2)
    sizes = jnp.array([0, 20, 13], jnp.int32)  # groups 1 and 2 of the window at offset 3: experts 4 and 5
    x = _rand(rng, (33, k))
    bs = GmmBlocks(bm=16, bn=128, bk=128)
    got = grouped_matmul(x, w, sizes, None, 3, block_sizes=bs, interpret=True)
    _close(got, grouped_matmul_reference(x, w, sizes, None, 3), jnp.float32)
    wrong = grouped_matmul_reference(x, w, sizes, None, 2)  # the twin: an off-by-one offset is visible
    assert np.abs(np.asarray(got) - np.asarray(wrong)).max() > 0.1 * np.abs(np.asarray(got)).max()


def test_grouped_matmul_bad_shapes():
    x, w, gs = jnp.ones((8, 48)), jnp.ones((2, 48, 32)), jnp.array([4, 4])
    with pytest.raises(ValueError, match="K=48 must be a multiple of bk=32"):
        grouped_matmul(x, w, gs, block_sizes=SMALL_GMM, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        grouped_matmul(jnp.ones((8, 64)), jnp.ones((2, 64, 32)), gs, block_sizes=GmmBlocks(bm=24, bn=16, bk=32),
                       interpret=True)


@pytest.mark.parametrize("lengths,splits", [([1, 100, 256], 1), ([1, 100, 256], 4), ([17, 5, 33], 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mla_decode_matches_reference(lengths, splits, dtype):
    """Lengths not a multiple of the chunk, a single token, the longest shorter than the cache (empty splits)."""
    rng = np.random.default_rng(len(lengths) + splits)
    b, n, c, r, s = 3, 32, 64, 16, 256
    q, qp = _rand(rng, (b, n, c), dtype), _rand(rng, (b, n, r), dtype)
    ck, kr = _rand(rng, (b, s, c), dtype), _rand(rng, (b, s, r), dtype)
    lens = jnp.array(lengths)
    got = mla_decode(q, qp, ck, kr, lens, sm_scale=0.1, block_sizes=DecodeBlocks(bh=16, bt=32, splits=splits),
                     interpret=True)
    _close(got, mla_decode_reference(q, qp, ck, kr, lens, sm_scale=0.1), dtype)


def test_mla_decode_fp8_cache():
    """An FP8 cache as 16-bit words, its scales on the float32 scores and output; the twin without the scales
    differs."""
    rng = np.random.default_rng(9)
    b, n, c, r, s = 2, 16, 64, 16, 128
    q, qp = _rand(rng, (b, n, c)), _rand(rng, (b, n, r))
    ks = jnp.array([0.02, 0.05], jnp.float32)
    ck = pack_bytes((_rand(rng, (b, s, c)) / ks[0]).astype(jnp.float8_e4m3fn))
    kr = pack_bytes((_rand(rng, (b, s, r)) / ks[1]).astype(jnp.float8_e4m3fn))
    lens = jnp.array([128, 70])
    got = mla_decode(q, qp, ck, kr, lens, sm_scale=0.1, kv_scale=ks, block_sizes=DecodeBlocks(bh=16, bt=32, splits=2),
                     interpret=True)
    _close(got, mla_decode_reference(q, qp, ck, kr, lens, sm_scale=0.1, kv_scale=ks), jnp.float32)
    unscaled = mla_decode_reference(q, qp, ck, kr, lens, sm_scale=0.1, kv_scale=jnp.ones(2))
    assert np.abs(np.asarray(got) - np.asarray(unscaled)).max() > 0.1


def test_mla_decode_bad_shapes():
    q, qp = jnp.ones((1, 24, 64)), jnp.ones((1, 24, 16))
    bs = DecodeBlocks(bh=16, bt=32)
    with pytest.raises(ValueError, match="not a multiple of bh"):
        mla_decode(q, qp, jnp.ones((1, 64, 64)), jnp.ones((1, 64, 16)), jnp.array([3]), sm_scale=1.0,
                   block_sizes=bs)
    with pytest.raises(ValueError, match="power of two"):
        mla_decode(jnp.ones((1, 16, 576)), qp[:, :16], jnp.ones((1, 64, 576)), jnp.ones((1, 64, 16)), jnp.array([3]),
                   sm_scale=1.0, block_sizes=bs)
    with pytest.raises(ValueError, match="uint16 words"):
        mla_decode(q[:, :16], qp[:, :16], jnp.ones((1, 64, 64)), jnp.ones((1, 64, 16)), jnp.array([3]),
                   sm_scale=1.0, kv_scale=jnp.ones(2), block_sizes=bs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mla_prefill_matches_reference(dtype):
    rng = np.random.default_rng(11)
    b, t, n, h, r, v = 2, 64, 4, 32, 16, 32
    args = (_rand(rng, (b, t, n, h), dtype), _rand(rng, (b, t, n, r), dtype), _rand(rng, (b, t, n, h), dtype),
            _rand(rng, (b, t, r), dtype), _rand(rng, (b, t, n, v), dtype))
    lens = jnp.array([64, 37])  # ragged: one prompt ends mid-block
    got = mla_prefill(*args, lens, sm_scale=0.15, block_sizes=PrefillBlocks(bq=16, bk=16), interpret=True)
    _close(got, mla_prefill_reference(*args, lens, sm_scale=0.15), dtype)


def test_mla_prefill_bad_shapes():
    x = jnp.ones((1, 48, 2, 32))
    with pytest.raises(ValueError, match="multiple of bq"):
        mla_prefill(x, jnp.ones((1, 48, 2, 16)), x, jnp.ones((1, 48, 16)), x, jnp.array([48]), sm_scale=1.0,
                    block_sizes=PrefillBlocks(bq=32, bk=32))


# ---- lowering for CUDA (Triton), DeepSeek-V3's sizes for one layer, bf16, default block sizes ------------------

def _cuda(fn, *specs):
    assert "triton" in lower_for_cuda(fn, *specs).as_text().lower()


def test_grouped_matmul_lowers_for_cuda(deepseek_experts):
    x, w, gs = deepseek_experts["x"], deepseek_experts["bf16"], deepseek_experts["sizes"]
    _cuda(lambda x, w, g: grouped_matmul(x, w, g, interpret=False), x, w, gs)
    _cuda(lambda x, a, b, g: grouped_matmul(x, a, g, b, interpret=False), x, *[deepseek_experts["nvfp4"]] * 2, gs)
    for fmt in ("mxfp4", "fp8"):
        _cuda(lambda x, a, g: grouped_matmul(x, a, g, interpret=False), x, deepseek_experts[fmt], gs)


def test_lowering_survives_warnings_as_errors():
    """JAX 0.11 warns that the Triton backend is deprecated at every lowering: under `python -W error` a lowering
    must still succeed (pallas_kernels.common ignores that one warning)."""
    import subprocess
    import sys
    code = ("from pallas_kernels import arg_specs; from pallas_kernels.common import lower_for_cuda; "
            "from pallas_kernels.mla_decode import mla_decode; "
            "lower_for_cuda(lambda *a: mla_decode(*a, sm_scale=0.1, interpret=False), *arg_specs.decode(2, 16, 256))")
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]


def test_mla_kernels_lower_for_cuda(deepseek_attention):
    a = deepseek_attention
    _cuda(lambda *x: mla_decode(*x, sm_scale=0.1, interpret=False), *a["decode"])
    _cuda(lambda *x: mla_decode(*x[:-1], sm_scale=0.1, kv_scale=x[-1], interpret=False), *a["decode_fp8"])
    _cuda(lambda *x: mla_prefill(*x, sm_scale=0.1, interpret=False), *a["prefill"])


# ---- the model with backend="pallas" equals backend="xla" ------------------------------------------------------

def _model_logits(params, cfg, backend, kv_scale=None):
    from model import decode_step, init_cache, prefill
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    lens = np.array([24, 17])
    cache = init_cache(cfg, 2, 64, kv_scale=kv_scale)
    logits, cache = prefill(params, cache, toks, lens, cfg=cfg, all_logits=True, backend=backend)
    rows = [np.asarray(logits)[0], np.asarray(logits)[1, :17]]
    for i in range(3):
        step, cache = decode_step(params, cache, toks[:, i], cfg=cfg, backend=backend)
        rows.append(np.asarray(step))
    return np.concatenate(rows)


@pytest.mark.parametrize("recipe", [None, "nvfp4_w4a16", "r1_fp4"])
def test_model_pallas_backend_equals_xla(recipe):
    from helpers import random_params

    from model import TINY, calibrate, quantize_params
    params, kv = random_params(TINY, 0), None
    if recipe is not None:
        rng = np.random.default_rng(1)
        calib = calibrate(params, TINY, [rng.integers(0, TINY.vocab_size, 24) for _ in range(2)])
        params = quantize_params(params, TINY, recipe, calib)
        kv = calib.kv if recipe == "r1_fp4" else None
    xla = _model_logits(params, TINY, "xla", kv)
    pallas = _model_logits(params, TINY, "pallas", kv)
    assert not np.isnan(pallas).any()
    err = np.abs(pallas - xla).max() / np.abs(xla).max()
    assert err < 1e-4, err


def test_pallas_backend_errors():
    from helpers import random_params

    from model import TINY, init_cache, prefill
    params = random_params(TINY, 0)
    with pytest.raises(ValueError, match="unknown backend"):
        prefill(params, init_cache(TINY, 1, 16), np.ones((1, 4), np.int32), np.array([4]), cfg=TINY, backend="cuda")
