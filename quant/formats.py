"""Element and block formats, bit-faithful, as pure jnp functions over the last axis (the reduction axis).

Element formats
- E2M1 (FP4): codes 0..15, code & 7 indexes [0, 0.5, 1, 1.5, 2, 3, 4, 6], bit 3 is the sign. Round to nearest,
  ties to the even code, saturating at +-6 (inf -> +-6). E2M1 has no NaN: a NaN element encodes as +0, and the
  block quantizers below make its block's scale NaN instead, so a NaN is never silently lost (see `nan` below).
- E4M3 "fn" (FP8): `e4m3` clips to +-448 before the cast (the cast alone turns anything above 464 into NaN);
  NaN stays NaN.
- E8M0 (MX scale): uint8 holding a biased exponent (127), 0xFF = NaN; built from the exponent directly, never by
  casting (ml_dtypes' cast rounds in the linear domain, which is not the OCP rule).

Block formats (x: [..., K], blocks of consecutive elements along K)
- NVFP4 (block 16): s_tensor = amax(tensor) / (6 * 448);  s_block = e4m3(max(amax(block) / (6 s_tensor), 2^-9)),
  an all-zero block gets 1.0;  q = e2m1(x / (s_block * s_tensor));  x ~ q * s_block * s_tensor.
- MXFP4 (block 32, OCP MX v1.0): scale = 2^(floor(log2 amax(block)) - 2), or the round-up rule 2^ceil(log2(amax/6))
  (`rule="ceil"`); an all-zero block gets 2^0;  q = e2m1(x / scale).
- FP8 (DeepSeek): s = amax(block) / 448 in float32 (an all-zero block gets 1.0);  q = e4m3(x / s). Blocks of 128
  along K (and, for weights, 128 along the output rows: `fp8_quantize_2d`); a trailing partial block is allowed.

Float32 subnormals (below 2^-126) flush to zero in XLA's CPU and GPU arithmetic, so the E8M0 scale 2^-127 and
values that small read as 0.
Non-finite input: a block holding NaN or +-inf gets a NaN scale (E4M3 0x7F, E8M0 0xFF, float32 NaN), so its
dequantized values are all NaN.

Packing: two E2M1 codes per uint8, the even-index element in the low nibble (`pack_nibbles`); two E4M3 codes per
uint16, the even-index element in the low byte (`pack_bytes`; FP8 weights and the FP8 latent cache). Stored as
words, a tensor holds half as many elements: the Triton kernels index an operand of 2^31 elements or more with
wrapping 32-bit offsets unless it exceeds 2^32 bytes (pallas_kernels/common.py), and one layer's FP8 experts
(256 x 2048 x 7168 codes, 3.76 GB) would fall in that gap as bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32
E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
E2M1_MAX = 6.0
E4M3_MIN_SUBNORMAL = 2.0 ** -9

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Decision points between consecutive E2M1 magnitudes, and whether the tie goes up (to the even code above).
_E2M1_BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))



@dataclasses.dataclass(frozen=True)
class Format:
    """How a weight format is stored (the one table QArray, the sharding checks and the kernels read): two codes
    per stored element of `code_dtype` along the reduction axis K; scales of `scale_dtype` per `block` elements of
    K and per `row_block` output rows (FP8's 128 x 128 tiles; 1: per row); NVFP4's float32 per-matrix scale."""

    name: str
    code_dtype: Any
    block: int
    row_block: int
    scale_dtype: Any
    tensor_scale: bool
    codes_per_element: int = 2

    def bytes_per_param(self, rows: int, k: int) -> float:
        """Stored bytes per parameter of one [rows, K] matrix: codes and block scales (the per-matrix float32
        scale, 4 bytes a matrix, not included)."""
        tiles = -(-rows // self.row_block) * -(-k // self.block)
        return (jnp.dtype(self.code_dtype).itemsize / self.codes_per_element
                + tiles * jnp.dtype(self.scale_dtype).itemsize / (rows * k))


FORMATS = {
    "nvfp4": Format("nvfp4", jnp.uint8, block=16, row_block=1, scale_dtype=E4M3, tensor_scale=True),
    "mxfp4": Format("mxfp4", jnp.uint8, block=32, row_block=1, scale_dtype=jnp.uint8, tensor_scale=False),
    "fp8": Format("fp8", jnp.uint16, block=128, row_block=128, scale_dtype=F32, tensor_scale=False),
}


# ---- elements ------------------------------------------------------------------------------------------------

def e2m1_encode(x: jax.Array) -> jax.Array:
    """float -> E2M1 code (uint8 in 0..15): nearest value, ties to the even code, saturating; NaN -> +0."""
    x = x.astype(F32)
    a = jnp.abs(x)
    mag = sum(((a >= b) if up else (a > b)).astype(jnp.uint8) for b, up in _E2M1_BOUNDS)  # NaN compares False
    sign = jnp.where(jnp.signbit(x) & ~jnp.isnan(x), jnp.uint8(8), jnp.uint8(0))
    return (mag + sign).astype(jnp.uint8)


def e2m1_decode(codes: jax.Array) -> jax.Array:
    """E2M1 code (uint8) -> float32."""
    table = jnp.array(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), F32)
    return table[codes.astype(jnp.int32) & 15]


def e4m3(x: jax.Array) -> jax.Array:
    """float32 -> float8_e4m3fn, round to nearest even, saturating at +-448 (inf too); NaN stays NaN."""
    return jnp.clip(x.astype(F32), -E4M3_MAX, E4M3_MAX).astype(E4M3)


def e8m0_encode(exponent: jax.Array, nan: jax.Array | None = None) -> jax.Array:
    """Integer exponent -> E8M0 byte (bias 127, clamped to [-127, 127]); where `nan`, 0xFF."""
    u = (jnp.clip(exponent, -127, 127) + 127).astype(jnp.uint8)
    return u if nan is None else jnp.where(nan, jnp.uint8(255), u)


def e8m0_decode(u: jax.Array) -> jax.Array:
    """E8M0 byte -> float32 2^(u - 127), exact (2^-127 is a float32 subnormal); 0xFF -> NaN."""
    v = jnp.ldexp(jnp.ones(u.shape, F32), u.astype(jnp.int32) - 127)
    return jnp.where(u == 255, jnp.nan, v)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """uint8 codes [..., K] (K even) -> uint8 [..., K/2], element 2i in the low nibble of byte i."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing two 4-bit codes per byte needs an even last axis, got {codes.shape}")
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], -1, 2)
    return (c[..., 0] & 15) | ((c[..., 1] & 15) << 4)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """uint8 [..., K/2] -> uint8 codes [..., K]."""
    return jnp.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def pack_bytes(codes: jax.Array) -> jax.Array:
    """float8_e4m3fn codes [..., K] (K even) -> uint16 [..., K/2], element 2i in the low byte of word i."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing two FP8 codes per 16-bit word needs an even last axis, got {codes.shape}")
    b = jax.lax.bitcast_convert_type(codes.astype(E4M3), jnp.uint8).astype(jnp.uint16)
    b = b.reshape(*codes.shape[:-1], -1, 2)
    return b[..., 0] | (b[..., 1] << 8)


def unpack_bytes(words: jax.Array) -> jax.Array:
    """uint16 [..., W] -> float8_e4m3fn codes [..., 2W] (the inverse of `pack_bytes`)."""
    lo, hi = (words & 255).astype(jnp.uint8), (words >> 8).astype(jnp.uint8)
    b = jnp.stack([lo, hi], axis=-1).reshape(*words.shape[:-1], -1)
    return jax.lax.bitcast_convert_type(b, E4M3)


def div(x: jax.Array, y) -> jax.Array:
    """x / y as a correctly rounded IEEE division. XLA compiles a division by a broadcast value (a constant, a
    per-tensor or per-block scale) into a multiplication by its reciprocal, an ulp away from the scales and codes
    the recipes define; a divisor of x's full shape behind an optimization barrier keeps the true division."""
    x = jnp.asarray(x, F32)
    shape = jnp.broadcast_shapes(x.shape, jnp.shape(y))
    return jnp.broadcast_to(x, shape) / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(y, F32), shape))


# ---- blocks --------------------------------------------------------------------------------------------------

def _blocks(x: jax.Array, size: int) -> jax.Array:
    if x.shape[-1] % size:
        raise ValueError(f"the reduction axis ({x.shape[-1]}) must be a multiple of the {size}-element block")
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _finite_blocks(xb: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(xb), axis=-1)


def nvfp4_tensor_scale(amax: jax.Array) -> jax.Array:
    """s_tensor = amax / (6 * 448) in float32 (1.0 for an all-zero tensor)."""
    amax = jnp.asarray(amax, F32)
    return jnp.where(amax > 0, div(amax, E2M1_MAX * E4M3_MAX), F32(1.0))


def nvfp4_block_scales(xb: jax.Array, s_tensor: jax.Array) -> jax.Array:
    """E4M3 block scales of blocks xb [..., nb, 16] given s_tensor broadcastable to [..., nb]."""
    amax = jnp.max(jnp.abs(xb.astype(F32)), axis=-1)
    s = jnp.maximum(div(amax, F32(E2M1_MAX) * s_tensor), F32(E4M3_MIN_SUBNORMAL))
    s = jnp.where(amax == 0, F32(1.0), s)
    return jnp.where(_finite_blocks(xb), e4m3(s), jnp.array(jnp.nan, E4M3))


def nvfp4_quantize(x: jax.Array, s_tensor: jax.Array, block_scales: jax.Array | None = None):
    """x [..., K] -> (codes uint8 [..., K] unpacked, E4M3 scales [..., K/16]). s_tensor broadcasts to [..., 1].

    block_scales: chosen elsewhere (a scale search); default: the amax rule above.
    """
    xb = _blocks(x.astype(F32), 16)
    s_tensor = jnp.asarray(s_tensor, F32)
    sb = nvfp4_block_scales(xb, s_tensor) if block_scales is None else block_scales
    codes = e2m1_encode(div(xb, (sb.astype(F32) * s_tensor)[..., None]))
    return codes.reshape(x.shape), sb


def nvfp4_dequantize(codes: jax.Array, scales: jax.Array, s_tensor: jax.Array, dtype=F32) -> jax.Array:
    """codes [..., K] (unpacked), scales [..., K/16] E4M3 -> values [..., K]."""
    q = _blocks(e2m1_decode(codes), 16)
    v = q * scales.astype(F32)[..., None] * jnp.asarray(s_tensor, F32)[..., None]
    return v.reshape(codes.shape).astype(dtype)


def mxfp4_exponents(xb: jax.Array, rule: str = "ocp") -> jax.Array:
    """Shared exponent of blocks xb [..., nb, 32]: OCP floor(log2 amax) - 2, or ceil(log2(amax / 6))."""
    amax = jnp.max(jnp.abs(xb.astype(F32)), axis=-1)
    safe = jnp.where((amax > 0) & jnp.isfinite(amax), amax, F32(1.0))
    _, ex = jnp.frexp(safe)  # safe = mant * 2^ex, mant in [0.5, 1): floor(log2) = ex - 1, exactly
    if rule == "ocp":
        e = ex - 1 - 2
    elif rule == "ceil":
        m6, ex6 = jnp.frexp(div(safe, E2M1_MAX))  # exact: log2(amax/6) is an integer iff mant == 0.5
        e = jnp.where(m6 == 0.5, ex6 - 1, ex6)
    else:
        raise ValueError(f"unknown MX scale rule {rule!r}: 'ocp' or 'ceil'")
    return jnp.where(amax > 0, e, 0).astype(jnp.int32)


def mxfp4_quantize(x: jax.Array, rule: str = "ocp", exponents: jax.Array | None = None):
    """x [..., K] -> (codes uint8 [..., K] unpacked, E8M0 scales uint8 [..., K/32])."""
    xb = _blocks(x.astype(F32), 32)
    e = mxfp4_exponents(xb, rule) if exponents is None else exponents
    e = jnp.clip(e, -127, 127)
    codes = e2m1_encode(jnp.ldexp(xb, -e[..., None]))  # exact division by a power of two
    return codes.reshape(x.shape), e8m0_encode(e, ~_finite_blocks(xb))


def mxfp4_dequantize(codes: jax.Array, scales: jax.Array, dtype=F32) -> jax.Array:
    q = _blocks(e2m1_decode(codes), 32)
    return (q * e8m0_decode(scales)[..., None]).reshape(codes.shape).astype(dtype)


def fp8_scales(xb: jax.Array) -> jax.Array:
    """float32 s = amax / 448 over the last axis of blocks (1.0 for all-zero blocks, NaN for non-finite ones)."""
    amax = jnp.max(jnp.abs(xb.astype(F32)), axis=-1)
    s = jnp.where(amax > 0, div(amax, E4M3_MAX), F32(1.0))
    return jnp.where(_finite_blocks(xb), s, jnp.nan)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = -x.shape[axis] % size
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def fp8_quantize_1d(x: jax.Array, block: int = 128):
    """Activations: 1 x block along the last axis. x [..., K] -> (E4M3 [..., K], scales f32 [..., ceil(K/block)])."""
    k = x.shape[-1]
    xb = _blocks(_pad_to(x.astype(F32), -1, block), block)
    s = fp8_scales(xb)
    q = e4m3(div(xb, s[..., None])).reshape(*x.shape[:-1], -1)[..., :k]
    return q, s


def fp8_dequantize_1d(q: jax.Array, s: jax.Array, dtype=F32, block: int = 128) -> jax.Array:
    k = q.shape[-1]
    qb = _blocks(_pad_to(q.astype(F32), -1, block), block)
    return (qb * s[..., None]).reshape(*q.shape[:-1], -1)[..., :k].astype(dtype)


def fp8_quantize_2d(w: jax.Array, block: int = 128):
    """Weights: block x block tiles over the last two axes [..., N, K] (DeepSeek's layout of [out, in]).

    Returns (E4M3 [..., N, K], float32 scales [..., ceil(N/block), ceil(K/block)] = DeepSeek's weight_scale_inv).
    """
    n, k = w.shape[-2:]
    wp = _pad_to(_pad_to(w.astype(F32), -1, block), -2, block)
    nb, kb = wp.shape[-2] // block, wp.shape[-1] // block
    tiles = wp.reshape(*w.shape[:-2], nb, block, kb, block)
    tiles = jnp.swapaxes(tiles, -3, -2).reshape(*w.shape[:-2], nb, kb, block * block)
    s = fp8_scales(tiles)
    q = e4m3(div(tiles, s[..., None])).reshape(*w.shape[:-2], nb, kb, block, block)
    q = jnp.swapaxes(q, -3, -2).reshape(*wp.shape)[..., :n, :k]
    return q, s


def fp8_dequantize_2d(q: jax.Array, s: jax.Array, dtype=F32, block: int = 128) -> jax.Array:
    n, k = q.shape[-2:]
    full = jnp.repeat(jnp.repeat(s, block, axis=-2), block, axis=-1)[..., :n, :k]
    return (q.astype(F32) * full).astype(dtype)
