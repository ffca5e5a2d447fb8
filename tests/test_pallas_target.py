"""What the kernels must be on Hopper, checked on this CPU machine from the kernels' own jaxprs and arithmetic:
dots on bf16 operands with float32 accumulation (never float32 x float32 for bf16 inputs), no exp2 in the FP4
decode, operands the Triton lowering indexes without wrapping 32-bit offsets, tiles within one block's shared
memory, and the sequence split only where the grid would not fill the GPU. Each check has a wrong twin that it
catches: the form the kernels had before these were fixed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import SMEM_BYTES, e2m1_value, e8m0_value, offsets_fit
from pallas_kernels.grouped_matmul import BlockSizes as GmmBlocks
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.grouped_matmul import smem_bytes as gmm_smem
from pallas_kernels.mla_decode import BlockSizes as DecodeBlocks
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.mla_decode import smem_bytes as decode_smem
from pallas_kernels.mla_prefill import BlockSizes as PrefillBlocks
from pallas_kernels.mla_prefill import mla_prefill
from pallas_kernels.mla_prefill import smem_bytes as prefill_smem
from quant import formats as F


def kernel_eqns(fn, *args):
    """Every equation inside every pallas_call kernel that fn(*args) traces (sub-jaxprs of loops and conds too),
    with the pallas_call equations themselves: [(kernel name, eqn)]."""
    found = []

    def walk(jaxpr, kernel):
        for e in jaxpr.eqns:
            name = kernel
            if e.primitive.name == "pallas_call":
                name = e.params.get("name") or "pallas_call"
                found.append((name, e))
                walk(e.params["jaxpr"], name)
                continue
            if kernel is not None:
                found.append((kernel, e))
            for p in e.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner, name)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, None)
    return found


def dot_operand_dtypes(fn, *args) -> set:
    return {tuple(jnp.dtype(v.aval.dtype).name for v in e.invars) for _, e in kernel_eqns(fn, *args)
            if e.primitive.name == "dot_general"}


def _kernel_cases(experts, attention):
    x, gs = experts["x"], experts["sizes"]
    cases = {f"grouped_matmul {fmt}": (lambda x, w, g: grouped_matmul(x, w, g, interpret=False), x, experts[fmt], gs)
             for fmt in ("bf16", "fp8", "nvfp4", "mxfp4")}
    cases["grouped_matmul swiglu nvfp4"] = (lambda x, a, b, g: grouped_matmul(x, a, g, b, interpret=False), x,
                                            experts["nvfp4"], experts["nvfp4"], gs)
    cases["mla_decode"] = (lambda *a: mla_decode(*a, sm_scale=0.1, interpret=False), *attention["decode"])
    cases["mla_decode fp8 cache"] = (lambda *a: mla_decode(*a[:-1], sm_scale=0.1, kv_scale=a[-1], interpret=False),
                                     *attention["decode_fp8"])
    cases["mla_prefill"] = (lambda *a: mla_prefill(*a, sm_scale=0.1, interpret=False), *attention["prefill"])
    return cases


# ---- dots on bf16 operands --------------------------------------------------------------------------------------

def test_kernel_dots_take_bf16_operands(deepseek_experts, deepseek_attention):
    for name, (fn, *args) in _kernel_cases(deepseek_experts, deepseek_attention).items():
        dtypes = dot_operand_dtypes(fn, *args)
        assert dtypes, f"{name}: no dot found in the kernel"
        assert dtypes <= {("bfloat16", "bfloat16")}, f"{name}: dots on {dtypes}"


def test_dot_check_catches_a_float32_upcast():
    """The twin: a kernel that upcasts bf16 tiles before its dot (as the attention kernels once did)."""
    def upcasting(a_ref, b_ref, o_ref):
        o_ref[...] = jnp.dot(a_ref[...].astype(jnp.float32), b_ref[...].astype(jnp.float32))

    def call(a, b):
        return pl.pallas_call(upcasting, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32), interpret=True)(a, b)

    spec = jax.ShapeDtypeStruct((16, 16), jnp.bfloat16)
    assert dot_operand_dtypes(call, spec, spec) == {("float32", "float32")}


# ---- the FP4 decode without exp2 --------------------------------------------------------------------------------

def test_fp4_scale_decodes_use_no_exp2(deepseek_experts):
    x, gs = deepseek_experts["x"], deepseek_experts["sizes"]
    for fmt in ("nvfp4", "mxfp4"):
        prims = {e.primitive.name for _, e in kernel_eqns(lambda x, w, g: grouped_matmul(x, w, g, interpret=False),
                                                          x, deepseek_experts[fmt], gs)}
        assert not prims & {"exp2", "pow", "exp"}, f"{fmt}: {prims & {'exp2', 'pow', 'exp'}}"


def test_exp2_check_catches_an_exp2_decode():
    def decoding(c_ref, o_ref):
        c = c_ref[...]
        o_ref[...] = jnp.exp2(((c >> 1) & 3).astype(jnp.float32))
    call = lambda c: pl.pallas_call(decoding, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),  # noqa: E731
                                    interpret=True)(c)
    assert "exp2" in {e.primitive.name for _, e in kernel_eqns(call, jax.ShapeDtypeStruct((16,), jnp.int32))}


def test_bit_decodes_equal_the_format_tables():
    codes = jnp.arange(16, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(e2m1_value(codes)), np.asarray(F.e2m1_decode(codes.astype(jnp.uint8))))
    b = jnp.arange(256, dtype=jnp.int32)
    want = np.asarray(F.e8m0_decode(b.astype(jnp.uint8)))
    want = np.where(np.arange(256) == 0, 0.0, want)  # 2^-127 is a float32 subnormal: XLA flushes it to zero
    np.testing.assert_array_equal(np.asarray(e8m0_value(b)), want)
    words = F.pack_bytes(jnp.arange(-8, 8, dtype=jnp.float32).astype(jnp.float8_e4m3fn))
    np.testing.assert_array_equal(np.asarray(common.e4m3_codes(common.word_bytes(words))).astype(np.float32),
                                  np.arange(-8, 8))
    packed = F.pack_nibbles(codes.astype(jnp.uint8))
    np.testing.assert_array_equal(np.asarray(common.nibbles(packed)), np.arange(16))


# ---- offsets --------------------------------------------------------------------------------------------------

def test_offset_rule_matches_the_lowering():
    """32-bit offsets reach 2^31 - 1 elements; 64-bit ones come above 2^32 bytes. One layer's FP8 experts
    [256, 2048, 7168] as bytes fall in between (experts >= 146 would wrap); as 16-bit words they do not."""
    assert not offsets_fit((256, 2048, 7168), jnp.float8_e4m3fn)
    assert offsets_fit((256, 2048, 7168 // 2), jnp.uint16)
    assert offsets_fit((256, 7168, 2048), jnp.bfloat16)  # 7.5 GB: 64-bit offsets
    assert offsets_fit((2 ** 31,), jnp.bfloat16) and not offsets_fit((2 ** 31 + 1,), jnp.uint8)
    with pytest.raises(ValueError, match="weights .* 2\\^31 or more"):
        common.check_offsets("kernel", {"weights": jax.ShapeDtypeStruct((256, 2048, 7168), jnp.float8_e4m3fn)})


def test_every_kernel_operand_is_indexed_without_wrapping(deepseek_experts, deepseek_attention):
    """By construction at DeepSeek's sizes, including one layer's FP8 experts (3.76 GB) and a 128 x 32k FP8 cache:
    every operand of every pallas_call fits the lowering's offsets."""
    cases = _kernel_cases(deepseek_experts, deepseek_attention)
    sd, u16 = jax.ShapeDtypeStruct, jnp.uint16
    b, s = 128, 32768
    cases["mla_decode fp8 cache 128 x 32k"] = (
        lambda *a: mla_decode(*a[:-1], sm_scale=0.1, kv_scale=a[-1], interpret=False),
        sd((b, 16, 512), jnp.bfloat16), sd((b, 16, 64), jnp.bfloat16), sd((b, s, 256), u16), sd((b, s, 32), u16),
        sd((b,), jnp.int32), sd((2,), jnp.float32))
    for name, (fn, *args) in cases.items():
        calls = [e for _, e in kernel_eqns(fn, *args) if e.primitive.name == "pallas_call"]
        assert calls, name
        for e in calls:
            for v in e.invars:
                assert offsets_fit(v.aval.shape, v.aval.dtype), (name, v.aval)


# ---- shared memory ----------------------------------------------------------------------------------------------

def test_default_tiles_fit_shared_memory():
    """The defaults at DeepSeek's sizes, by arithmetic (bytes per block):
    mla_decode, 128 heads, bf16: bh 64, bt 32, 2 stages: 2 x 32 x 576 x 2 (cache tiles) + 64 x 576 x 2 (queries)
      + 64 x 32 x 2 (probabilities) = 151,552 (the [64, 512] float32 output after the loop: 131,072);
    mla_prefill, 4k tokens: bq 128, bk 64, 3 stages: 3 x 64 x (128 + 64 + 128) x 2 + 128 x 192 x 2 + 128 x 64 x 2
      = 188,416;
    grouped_matmul, decode, NVFP4 gate + up: bm 16, bn 64, bk 128, 3 stages: 3 x (16 x 128 x 2 + 2 x (4096 + 512))
      + 2 x 64 x 128 x 2 + 16 x 64 x 4 = 76,800."""
    d = DecodeBlocks.get_default(batch=32, heads=128, cache_len=4096, latent=512, rope=64, itemsize=2)
    assert (d.bh, d.bt, d.num_stages) == (64, 32, 2)
    assert decode_smem(d, latent=512, rope=64, q_itemsize=2) == 151_552
    p = PrefillBlocks.get_default(length=4096)
    assert (p.bq, p.bk, p.num_stages) == (128, 64, 3)
    assert prefill_smem(p, qk_dim=128, rope=64, v_dim=128, itemsize=2) == 188_416
    g = GmmBlocks.get_default(rows=64 * 8, groups=256, k=7168, n=2048, fmt="nvfp4", n_weights=2)
    assert (g.bm, g.bn, g.bk, g.num_stages) == (16, 64, 128, 3)
    assert gmm_smem(g, fmt="nvfp4", x_itemsize=2, n_weights=2) == 76_800
    for heads in (16, 128):
        for fp8 in (False, True):
            bs = DecodeBlocks.get_default(batch=128, heads=heads, cache_len=32768, latent=512, rope=64, itemsize=2,
                                          fp8=fp8)
            assert decode_smem(bs, latent=512, rope=64, q_itemsize=2, fp8=fp8) <= SMEM_BYTES
    for fmt, n_w in (("bf16", 2), ("fp8", 2), ("nvfp4", 2), ("mxfp4", 2), ("bf16", 1)):
        kind = "plain" if fmt == "bf16" else fmt
        for rows in (8, 512, 32768):
            for itemsize in (2, 4):  # bf16, and float32 models (twice the bytes per tile)
                bs = GmmBlocks.get_default(rows=rows, groups=256, k=7168, n=2048, fmt=kind, x_itemsize=itemsize,
                                           w_itemsize=itemsize, n_weights=n_w)
                assert gmm_smem(bs, fmt=kind, x_itemsize=itemsize, w_itemsize=itemsize,
                                n_weights=n_w) <= SMEM_BYTES, (fmt, rows, bs)


def test_tiles_over_shared_memory_are_refused_before_lowering(deepseek_attention):
    """The twin: 64 heads x 128 cache rows in 3 stages needs about 0.6 MB; the wrapper names it."""
    big = DecodeBlocks(bh=64, bt=128, splits=1, num_warps=8, num_stages=3)
    assert decode_smem(big, latent=512, rope=64, q_itemsize=2) > SMEM_BYTES
    with pytest.raises(ValueError, match="shared memory"):
        jax.eval_shape(lambda *a: mla_decode(*a, sm_scale=0.1, block_sizes=big, interpret=False),
                       *deepseek_attention["decode"])


# ---- when to split the sequence ---------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,heads,cache_len", [(1, 16, 4096), (32, 16, 4096), (32, 128, 4096),
                                                    (128, 128, 4096), (128, 16, 32768), (4, 128, 65536)])
def test_split_kv_only_where_the_grid_would_not_fill_the_gpu(batch, heads, cache_len):
    bs = DecodeBlocks.get_default(batch=batch, heads=heads, cache_len=cache_len, latent=512, rope=64, itemsize=2)
    programs = batch * heads // bs.bh
    if programs >= common.NUM_SMS:
        assert bs.splits == 1, bs  # a full grid: partial outputs would only cost bytes
    else:
        chunks = cache_len // bs.bt
        assert programs * bs.splits >= common.NUM_SMS or chunks // (2 * bs.splits) < 4, bs
        assert bs.splits > 1
