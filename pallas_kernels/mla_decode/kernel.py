"""MLA decode attention in the weight-absorbed form on Triton, split over the sequence where the grid needs it.

    out[b, n] = softmax_s(scale * (q_lat[b, n] . c_kv[b, s] + q_pe[b, n] . k_pe[b, s]), s < length[b]) . c_kv[b]

Per sequence and head the query is the latent query q_lat [C] (q_nope folded through W_uk) plus the rope query
q_pe [R]; keys and values are the cache itself (W_uv and W_o are applied outside). C = 512 and R = 64 travel as two
operands: Triton tiles are powers of two and 576 is not one.

Grid (B, N / bh, splits). A program holds bh heads of one sequence, so the cache is read N / bh times; it walks
its share of the sequence in chunks of bt with an online softmax in float32 and writes its partial (o, lse);
`combine` merges the splits (an empty split has lse = -inf and weight 0). Splitting the sequence only pays where
B * N / bh programs would leave streaming multiprocessors idle, which `BlockSizes.get_default` decides.

Dots run on the activations' dtype (bf16 in production) with float32 accumulation: the scores from (q, cache
tile), the output from (probabilities cast to that dtype, cache tile). An FP8 cache (codes two per 16-bit word,
per-layer scales for c_kv and k_pe) is converted to that dtype in registers, exactly; its scales multiply the
float32 scores and the float32 output, never a low-precision operand.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import (
    F32,
    NUM_SMS,
    SMEM_BYTES,
    check_offsets,
    check_smem,
    check_tile,
    e4m3_codes,
    interpret_default,
    num_sms,
    word_bytes,
)

NAME = "mla_decode"
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """bh heads per program, bt cache positions per step, splits of the sequence; Triton's warps and stages."""

    bh: int = 16
    bt: int = 64
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def get_default(cls, *, batch: int, heads: int, cache_len: int, latent: int, rope: int, itemsize: int,
                    fp8: bool = False, sms: int = NUM_SMS) -> BlockSizes:
        """bh: up to 64 heads per program (128 heads re-read the cache twice, not eight times as with 16), with 8
        warps for its [64, C] float32 accumulator; bt: the largest of 64, 32, 16 dividing the cache length whose
        tiles fit 90% of shared memory; splits: doubled while B * N / bh programs (times splits) leave SMs idle
        and each split keeps at least 4 chunks."""
        bh = 64
        while bh > 16 and heads % bh:
            bh //= 2
        warps = 8 if bh >= 64 else 4
        bt = 64
        while bt > 16 and (cache_len % bt or smem_bytes(cls(bh, bt, 1, warps, 2), latent=latent, rope=rope,
                                                        q_itemsize=itemsize, fp8=fp8) > 0.9 * SMEM_BYTES):
            bt //= 2
        programs, chunks, splits = batch * max(heads // bh, 1), max(cache_len // bt, 1), 1
        while programs * splits < sms and chunks % (2 * splits) == 0 and chunks // (2 * splits) >= 4:
            splits *= 2
        return cls(bh=bh, bt=bt, splits=splits, num_warps=warps, num_stages=2)


def smem_bytes(bs: BlockSizes, *, latent: int, rope: int, q_itemsize: int, fp8: bool = False) -> int:
    """Shared memory of one block: each cache tile (latent and rope) buffered num_stages times; the queries, the
    probabilities and (FP8) the converted cache tile once as dot operands; or, after the loop, the float32 output
    tile on its way out, whichever is larger (Triton reuses the loop's buffers)."""
    width = latent + rope
    kv_itemsize = 1 if fp8 else q_itemsize
    loop = (bs.num_stages * bs.bt * width * kv_itemsize + bs.bh * width * q_itemsize + bs.bh * bs.bt * q_itemsize
            + (bs.bt * width * q_itemsize if fp8 else 0))
    return max(loop, bs.bh * latent * 4)


def _kernel(len_ref, scale_ref, q_ref, qpe_ref, c_ref, r_ref, o_ref, lse_ref, *, bt: int, split: int,
            sm_scale: float, fp8: bool):
    b, s = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    lo = s * split
    hi = jnp.minimum(lo + split, length)
    n_chunks = (jnp.maximum(hi - lo, 0) + bt - 1) // bt  # dynamic trip count: nothing past the length is read
    q, qpe = q_ref[...], qpe_ref[...]  # [bh, C], [bh, R] in the activations' dtype
    dt = q.dtype
    bh, c = q.shape
    sc, sr = scale_ref[0], scale_ref[1]

    def tile(ref, s0):  # [bt, width] in dt; FP8 words unpacked and converted exactly
        t = ref[b, pl.ds(s0, bt), :]
        return e4m3_codes(word_bytes(t)).astype(dt) if fp8 else t.astype(dt)

    def body(i, carry):
        m, l, acc = carry
        s0 = pl.multiple_of(lo + i * bt, bt)
        kv, kr = tile(c_ref, s0), tile(r_ref, s0)  # [bt, C]: keys (nope part) and values at once; [bt, R]
        s_c = jax.lax.dot_general(q, kv, (((1,), (1,)), ((), ())), preferred_element_type=F32)  # [bh, bt]
        s_r = jax.lax.dot_general(qpe, kr, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        scores = (s_c * sc + s_r * sr if fp8 else s_c + s_r) * sm_scale
        pos = s0 + jnp.arange(bt)
        scores = jnp.where((pos < hi)[None, :], scores, NEG_INF)
        m_new = jnp.maximum(m, scores.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        pv = jax.lax.dot_general(p.astype(dt), kv, (((1,), (0,)), ((), ())), preferred_element_type=F32)
        return m_new, l * alpha + p.sum(axis=1), acc * alpha[:, None] + pv

    init = (jnp.full((bh,), NEG_INF, F32), jnp.zeros((bh,), F32), jnp.zeros((bh, c), F32))
    m, l, acc = jax.lax.fori_loop(0, n_chunks, body, init)
    empty = l == 0
    o = acc / jnp.where(empty, 1.0, l)[:, None]
    o_ref[...] = jnp.where(empty[:, None], 0.0, o * sc if fp8 else o).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, NEG_INF, m + jnp.log(jnp.where(empty, 1.0, l)))


def check_shapes(n: int, c: int, r: int, s: int, bs: BlockSizes) -> None:
    for name, v in (("bh", bs.bh), ("bt", bs.bt), ("latent dim", c), ("rope dim", r)):
        check_tile(NAME, name, v)
    if n % bs.bh:
        raise ValueError(f"{NAME}: {n} heads are not a multiple of bh={bs.bh}")
    if s % bs.bt:
        raise ValueError(f"{NAME}: the cache length {s} must be a multiple of bt={bs.bt}")
    if bs.splits < 1 or (s // bs.bt) % bs.splits:
        raise ValueError(f"{NAME}: splits={bs.splits} must divide the {s // bs.bt} chunks of the cache")


def combine(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Merge per-split partials o [B, P, N, C], lse [B, P, N] -> [B, N, C] (float32)."""
    m = lse.max(axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # [B, P, N], 0 for empty splits
    den = w.sum(axis=1)
    num = jnp.einsum("BPN,BPNC->BNC", w, o)
    return num / jnp.where(den == 0, 1.0, den)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret", "debug"))
def mla_decode(q_lat, q_pe, c_kv, k_pe, lengths, *, sm_scale: float, kv_scale=None,
               block_sizes: BlockSizes | None = None, interpret: bool | None = None, debug: bool = False):
    """q_lat [B, N, C], q_pe [B, N, R]; cache c_kv [B, S, C], k_pe [B, S, R] in a float dtype, or with kv_scale
    ([2] float32: c_kv, k_pe) FP8 codes two per 16-bit word, c_kv [B, S, C/2] and k_pe [B, S, R/2] uint16
    (quant.formats.pack_bytes); lengths [B]: attend to s < length. Returns [B, N, C] float32."""
    b, n, c = q_lat.shape
    r = q_pe.shape[-1]
    s = c_kv.shape[1]
    fp8 = kv_scale is not None
    if fp8 and (c_kv.dtype != jnp.uint16 or c_kv.shape[-1] * 2 != c or k_pe.shape[-1] * 2 != r):
        raise ValueError(f"{NAME}: an FP8 cache (kv_scale given) comes as uint16 words [B, S, C/2] and [B, S, R/2]; "
                         f"got {c_kv.dtype} {c_kv.shape} and {k_pe.shape} for C={c}, R={r}")
    bs = block_sizes or BlockSizes.get_default(batch=b, heads=n, cache_len=s, latent=c, rope=r,
                                               itemsize=q_lat.dtype.itemsize, fp8=fp8, sms=num_sms())
    check_shapes(n, c, r, s, bs)
    check_smem(NAME, smem_bytes(bs, latent=c, rope=r, q_itemsize=q_lat.dtype.itemsize, fp8=fp8), bs)
    out_shape = (jax.ShapeDtypeStruct((b, bs.splits, n, c), F32), jax.ShapeDtypeStruct((b, bs.splits, n), F32))
    check_offsets(NAME, {"q_lat": q_lat, "q_pe": q_pe, "c_kv": c_kv, "k_pe": k_pe, "partial outputs": out_shape[0]})
    scale = jnp.ones((2,), F32) if kv_scale is None else jnp.asarray(kv_scale, F32).reshape(2)
    whole = pl.BlockSpec()
    o, lse = pl.pallas_call(
        functools.partial(_kernel, bt=bs.bt, split=s // bs.splits, sm_scale=sm_scale, fp8=fp8),
        out_shape=out_shape,
        grid=(b, n // bs.bh, bs.splits),
        in_specs=[whole, whole, pl.BlockSpec((None, bs.bh, c), lambda i, h, p: (i, h, 0)),
                  pl.BlockSpec((None, bs.bh, r), lambda i, h, p: (i, h, 0)), whole, whole],
        out_specs=[pl.BlockSpec((None, None, bs.bh, c), lambda i, h, p: (i, p, h, 0)),
                   pl.BlockSpec((None, None, bs.bh), lambda i, h, p: (i, p, h))],
        interpret=interpret_default() if interpret is None else interpret,
        debug=debug,
        compiler_params=plt.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        name=NAME,
    )(lengths.astype(jnp.int32), scale, q_lat, q_pe, c_kv, k_pe)
    return combine(o, lse)
