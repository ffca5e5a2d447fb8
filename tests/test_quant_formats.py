"""Bit-exactness of the formats against the table-driven reference (tests/quant_reference.py) and ml_dtypes,
adversarial values, packing, error figures, the scale search, and QArray under jit and orbax."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import quant_reference as ref

from quant import formats as F
from quant.qarray import QArray, dequantize, quantize
from quant.recipes import mxfp4_search_exponents, nvfp4_search_block_scales

E2M1_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
ADVERSARIAL = np.array([0.0, -0.0, 0.5, -0.5, 0.2499999, 0.2500001, *E2M1_TIES, *(-np.array(E2M1_TIES)),
                        6.0, 6.5, 7.0, -100.0, 1e30, np.inf, -np.inf, 1e-40, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11,
                        448.0, 464.0, 465.0, -500.0, 0.0625, 1.0625, 1.1875], np.float32)


def _random(shape, seed=0, dist="normal"):
    rng = np.random.default_rng(seed)
    if dist == "t3":
        return rng.standard_t(3, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def test_e2m1_codes_match_reference_and_ml_dtypes():
    x = np.concatenate([ADVERSARIAL, _random(2000) * 3, np.linspace(-7, 7, 561, dtype=np.float32)])
    ours = np.asarray(F.e2m1_encode(jnp.asarray(x)))
    np.testing.assert_array_equal(ours, ref.e2m1_codes(x))
    # ml_dtypes stores one fp4 per byte, bits in the low nibble
    theirs = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 15
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(np.asarray(F.e2m1_decode(jnp.arange(16, dtype=jnp.uint8))), ref.E2M1)


def test_e2m1_ties_go_to_even_and_saturate():
    got = np.asarray(F.e2m1_decode(F.e2m1_encode(jnp.array(E2M1_TIES + [6.5, 1e9, np.inf, -np.inf]))))
    np.testing.assert_array_equal(got, [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -6.0])


def test_e2m1_nan_and_negative_zero():
    codes = np.asarray(F.e2m1_encode(jnp.array([np.nan, -np.nan, -0.0, 0.0])))
    np.testing.assert_array_equal(codes, [0, 0, 8, 0])  # NaN -> +0 (its block scale carries the NaN)


def test_e4m3_matches_reference_and_ml_dtypes():
    x = np.concatenate([ADVERSARIAL, _random(3000) * 50, _random(500) * 1e-2])
    ours = np.asarray(F.e4m3(jnp.asarray(x))).view(np.uint8)
    np.testing.assert_array_equal(ours, ref.e4m3_codes(x))
    theirs = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(ours, theirs)
    nan = np.asarray(F.e4m3(jnp.array([np.nan]))).view(np.uint8)
    assert nan[0] & 0x7F == 0x7F  # NaN stays NaN; inf saturates (in ADVERSARIAL above)


def test_e8m0_roundtrip_exact():
    e = jnp.arange(-127, 128)
    u = F.e8m0_encode(e)
    np.testing.assert_array_equal(np.asarray(u), np.arange(256)[:255])
    want = np.exp2(np.arange(-127, 128, dtype=np.float64)).astype(np.float32)
    # 2^-127 is a float32 subnormal, which XLA flushes to zero (as GPUs do with FTZ): every other scale is exact
    np.testing.assert_array_equal(np.asarray(F.e8m0_decode(u))[1:], want[1:])
    assert np.isnan(np.asarray(F.e8m0_decode(jnp.array([255], jnp.uint8))))[0]


def test_pack_unpack_every_byte():
    every = jnp.arange(256, dtype=jnp.uint8)
    codes = F.unpack_nibbles(every)
    np.testing.assert_array_equal(np.asarray(codes)[0::2], np.arange(256) & 15)  # low nibble = even element
    np.testing.assert_array_equal(np.asarray(codes)[1::2], np.arange(256) >> 4)
    np.testing.assert_array_equal(np.asarray(F.pack_nibbles(codes)), np.arange(256))
    np.testing.assert_array_equal(np.asarray(F.pack_nibbles(codes)), ref.pack(np.asarray(codes)))
    with pytest.raises(ValueError, match="even"):
        F.pack_nibbles(jnp.zeros((3,), jnp.uint8))


@pytest.mark.parametrize("dist", ["normal", "t3"])
def test_nvfp4_bit_exact(dist):
    x = _random((8, 256), 1, dist)
    x[0, :16] = 0.0  # an all-zero block: scale 1.0
    x[1, :16] = 1e-30  # tiny block: scale clamps at 2^-9
    x[2, 5] = 1e4  # dominant outlier
    codes, sb = F.nvfp4_quantize(jnp.asarray(x), F.nvfp4_tensor_scale(jnp.max(jnp.abs(jnp.asarray(x)))))
    rc, rs, rst = ref.nvfp4(x)
    np.testing.assert_array_equal(np.asarray(codes), rc)
    np.testing.assert_array_equal(np.asarray(sb).view(np.uint8), rs)
    deq = F.nvfp4_dequantize(codes, sb, F.nvfp4_tensor_scale(jnp.max(jnp.abs(jnp.asarray(x)))))
    np.testing.assert_array_equal(np.asarray(deq), ref.nvfp4_dequant(rc, rs, rst))


@pytest.mark.parametrize("dist", ["normal", "t3"])
def test_mxfp4_bit_exact(dist):
    x = _random((8, 256), 2, dist) * 0.01
    x[0, :32] = 0.0
    x[1, :32] = 2.0 ** -120  # tiny but normal (XLA flushes float32 subnormals)
    codes, sb = F.mxfp4_quantize(jnp.asarray(x))
    rc, rs = ref.mxfp4(x)
    np.testing.assert_array_equal(np.asarray(codes), rc)
    np.testing.assert_array_equal(np.asarray(sb), rs)
    np.testing.assert_array_equal(np.asarray(F.mxfp4_dequantize(codes, sb)), ref.mxfp4_dequant(rc, rs))


def test_mxfp4_ocp_clips_where_ceil_does_not():
    x = jnp.full((32,), 7.0)  # scaled max 7 -> OCP saturates at 6, round-up keeps 3.5 * 2
    c_ocp, s_ocp = F.mxfp4_quantize(x, "ocp")
    c_ceil, s_ceil = F.mxfp4_quantize(x, "ceil")
    assert float(F.mxfp4_dequantize(c_ocp, s_ocp)[0]) == 6.0
    assert float(F.mxfp4_dequantize(c_ceil, s_ceil)[0]) == 8.0  # 7/2 = 3.5 -> 4 (tie to even) * 2


def test_fp8_activation_blocks_bit_exact():
    x = _random((4, 384), 3) * 30
    x[0, :128] = 0.0
    q, s = F.fp8_quantize_1d(jnp.asarray(x))
    rc, rs = ref.fp8_rows(x)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), rc)
    np.testing.assert_array_equal(np.asarray(s), rs)


def test_fp8_weight_tiles_partial_blocks():
    w = _random((200, 300), 4)  # not multiples of 128: trailing partial tiles
    q, s = F.fp8_quantize_2d(jnp.asarray(w))
    assert s.shape == (2, 3)
    tile = w[128:, 256:]
    np.testing.assert_allclose(float(s[1, 2]), np.abs(tile).max() / 448, rtol=1e-7)
    rc = ref.e4m3_codes(tile / np.float32(np.abs(tile).max() / np.float32(448)))
    np.testing.assert_array_equal(np.asarray(q)[128:, 256:].view(np.uint8), rc)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8"])
def test_non_finite_poisons_only_its_block(fmt):
    x = _random((2, 256), 5)
    x[0, 3] = np.nan
    x[1, 200] = np.inf
    q = quantize(jnp.asarray(x.T), fmt, k_axis=-2)  # [K, N] weight, reduction axis first
    d = np.asarray(dequantize(q)).T
    block = {"nvfp4": 16, "mxfp4": 32, "fp8": 128}[fmt]
    assert np.isnan(d[0, :block]).all() and np.isnan(d[1, 128 + (72 // block) * block:][:block]).all()
    if fmt != "fp8":  # fp8 weight tiles are 128 x 128: both rows share a tile here
        assert np.isfinite(d[0, block:]).all() and np.isfinite(d[1, :128]).all()


def sqnr(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 10 * np.log10(np.sum(x ** 2) / np.sum((x - y) ** 2))


# published (1024 x 1024): Gaussian NVFP4 20.4, MXFP4 18.8, FP8 31.6; Student-t3 20.8, 17.0, 31.7
@pytest.mark.parametrize("dist,want", [("normal", {"nvfp4": 20.4, "mxfp4": 18.8, "fp8": 31.6}),
                                       ("t3", {"nvfp4": 20.8, "mxfp4": 17.0, "fp8": 31.7})])
def test_sqnr_matches_published(dist, want):
    w = jnp.asarray(_random((1024, 1024), 6, dist))
    for fmt, db in want.items():
        got = sqnr(w, dequantize(quantize(w, fmt, k_axis=-2)))
        assert abs(got - db) < 0.4, (fmt, dist, got, db)


def test_scale_search_beats_amax():
    w = jnp.asarray(_random((256, 512), 7))
    s_t = F.nvfp4_tensor_scale(jnp.max(jnp.abs(w)))
    plain = sqnr(w, dequantize(quantize(w, "nvfp4", k_axis=-1)))
    sb = nvfp4_search_block_scales(w, s_t)
    searched = sqnr(w, dequantize(quantize(w, "nvfp4", k_axis=-1, block_scales=sb)))
    assert searched > plain + 0.4, (plain, searched)
    mx_plain = sqnr(w, dequantize(quantize(w, "mxfp4", k_axis=-1)))
    mx_search = sqnr(w, dequantize(quantize(w, "mxfp4", k_axis=-1, block_scales=mxfp4_search_exponents(w))))
    assert mx_search > mx_plain + 0.1, (mx_plain, mx_search)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8"])
def test_qarray_layout_and_stacks(fmt):
    """A stack [L, E, D, M] with reduction axis D: per-matrix tensor scales, codes stored [L, E, M, D/2]; equal
    to quantizing each matrix on its own (the reference, on the transposed [M, D] matrix)."""
    w = jnp.asarray(_random((2, 3, 64, 32), 8) * np.array([1, 10, 100], np.float32)[None, :, None, None])
    q = quantize(w, fmt, k_axis=-2, batch_ndim=2)
    assert q.shape == w.shape
    assert q.codes.shape == (2, 3, 32, 64 // 2)  # two codes per byte (FP4) or per 16-bit word (FP8)
    assert q.codes.dtype == (jnp.uint16 if fmt == "fp8" else jnp.uint8)
    for i in range(2):
        for j in range(3):
            one = quantize(w[i, j], fmt, k_axis=-2)
            np.testing.assert_array_equal(np.asarray(dequantize(q)[i, j]), np.asarray(dequantize(one)))
    if fmt == "nvfp4":
        rc, rs, rst = ref.nvfp4(np.asarray(w[1, 2]).T)
        np.testing.assert_array_equal(np.asarray(q.codes[1, 2]), ref.pack(rc))
        np.testing.assert_array_equal(np.asarray(q.scales[1, 2]).view(np.uint8), rs)
        assert float(q.tensor_scale[1, 2]) == rst
    if fmt == "fp8":  # the words hold the tiled quantizer's E4M3 codes, the even element in the low byte
        codes = np.asarray(F.fp8_quantize_2d(w[1, 2].T)[0]).view(np.uint8)
        words = np.asarray(q.codes[1, 2])
        np.testing.assert_array_equal(words & 255, codes[:, 0::2])
        np.testing.assert_array_equal(words >> 8, codes[:, 1::2])
        np.testing.assert_array_equal(np.asarray(F.unpack_bytes(q.codes[1, 2])).view(np.uint8), codes)
    jitted = jax.jit(dequantize)(q)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(dequantize(q)))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple of the 16-element block"):
        quantize(jnp.ones((24, 8)), "nvfp4", k_axis=-2)
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize(jnp.ones((32, 8)), "int3")
    with pytest.raises(ValueError, match="batch axes"):
        quantize(jnp.ones((4, 32, 8)), "nvfp4", k_axis=-3, batch_ndim=1)


def test_qarray_orbax_roundtrip(tmp_path):
    import orbax.checkpoint as ocp

    w = jnp.asarray(_random((2, 64, 32), 9))
    tree = {"nv": quantize(w, "nvfp4", k_axis=-2, batch_ndim=1, act="nvfp4", input_scale=jnp.ones(2) * 0.01),
            "mx": quantize(w, "mxfp4", k_axis=-2, batch_ndim=1), "f8": quantize(w, "fp8", k_axis=-2, batch_ndim=1)}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "q", tree)
    ckptr.wait_until_finished()
    back = ckptr.restore(tmp_path / "q", jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree))
    for k, original in tree.items():
        assert isinstance(back[k], QArray) and back[k].fmt == original.fmt
        for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(back[k])):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8"])
def test_reduction_over_two_axes_is_the_flattened_matrix(fmt):
    """The output projection [L, N, V, D] reduces over N x V at once: the same codes and scales as the flattened
    [L, N*V, D] matrix, the logical shape kept. The twin reduced over V alone differs for FP8 (its 128-blocks span
    heads) and NVFP4 (one tensor scale per head); MXFP4's 32-blocks inside V = 64 are the same either way."""
    w = jnp.asarray(_random((2, 4, 64, 32), 11))
    q = quantize(w, fmt, k_axis=-3, k_ndim=2, batch_ndim=1)
    flat = quantize(w.reshape(2, 256, 32), fmt, k_axis=-2, batch_ndim=1)
    assert q.shape == w.shape and q.k_dims == (4, 64) and q.k == 256
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(flat.codes))
    np.testing.assert_array_equal(np.asarray(q.scales).view(np.uint8), np.asarray(flat.scales).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(dequantize(flat)).reshape(w.shape))
    per_v = dequantize(quantize(w, fmt, k_axis=-2, batch_ndim=2))
    assert np.array_equal(np.asarray(per_v), np.asarray(dequantize(q))) == (fmt == "mxfp4")
