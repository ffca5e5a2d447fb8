"""MLA decode attention in the weight-absorbed form, split over the sequence (flash-decoding), in Pallas.

Per sequence b and head n the query is the latent query q_lat [C] (= q_nope . W_uk) plus the rope query q_pe [R];
keys and values are the cache itself: scores_s = scale * (q_lat . c_kv[s] + q_pe . k_pe[s]) over s < length[b],
out = softmax(scores) . c_kv  ([C]; W_uv and W_o are applied outside). C = 512 and R = 64 travel as two operands
(Triton needs power-of-two sizes; 576 is not one).

Grid (B, N / bh, splits): each program walks its share of the sequence in chunks of bt with an online softmax in
float32 and writes its partial (o, lse); `combine` merges the splits (an empty split has lse = -inf and weight 0).
The cache may be bf16/f32, or FP8 E4M3 with per-layer scales (c_kv and k_pe), dequantized in the kernel.
`mla_decode_reference` is the plain-jnp twin.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32
NEG_INF = float("-inf")


def _kernel(len_ref, scale_ref, q_ref, qpe_ref, c_ref, r_ref, o_ref, lse_ref, *, bt: int, split: int, sm_scale: float):
    b, s = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    lo = s * split
    hi = jnp.minimum(lo + split, length)
    n_chunks = (jnp.maximum(hi - lo, 0) + bt - 1) // bt  # dynamic trip count: nothing past the length is read
    q = q_ref[...].astype(F32)  # [bh, C]
    qpe = qpe_ref[...].astype(F32)  # [bh, R]
    sc, sr = scale_ref[0], scale_ref[1]
    bh, c = q.shape

    def body(i, carry):
        m, l, acc = carry
        s0 = pl.multiple_of(lo + i * bt, bt)
        kv = c_ref[b, pl.ds(s0, bt), :].astype(F32) * sc  # [bt, C]: keys (nope part) and values at once
        kr = r_ref[b, pl.ds(s0, bt), :].astype(F32) * sr  # [bt, R]
        scores = (jax.lax.dot_general(q, kv, (((1,), (1,)), ((), ())), preferred_element_type=F32)
                  + jax.lax.dot_general(qpe, kr, (((1,), (1,)), ((), ())), preferred_element_type=F32)) * sm_scale
        pos = s0 + jnp.arange(bt)
        scores = jnp.where((pos < hi)[None, :], scores, NEG_INF)  # [bh, bt]
        m_new = jnp.maximum(m, scores.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        l_new = l * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + jax.lax.dot_general(p, kv, (((1,), (0,)), ((), ())), preferred_element_type=F32)
        return m_new, l_new, acc

    init = (jnp.full((bh,), NEG_INF, F32), jnp.zeros((bh,), F32), jnp.zeros((bh, c), F32))
    m, l, acc = jax.lax.fori_loop(0, n_chunks, body, init)
    empty = l == 0
    o_ref[...] = jnp.where(empty[:, None], 0.0, acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, NEG_INF, m + jnp.log(jnp.where(empty, 1.0, l)))


def check_shapes(b: int, n: int, c: int, r: int, s: int, bh: int, bt: int, splits: int) -> None:
    for name, v in (("bh", bh), ("bt", bt), ("latent dim", c), ("rope dim", r)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"mla_decode: {name}={v} must be a power of two >= 16 (Triton tiles)")
    if n % bh:
        raise ValueError(f"mla_decode: {n} heads are not a multiple of bh={bh}")
    if s % bt:
        raise ValueError(f"mla_decode: the cache length {s} must be a multiple of bt={bt}")
    if splits < 1 or (s // bt) % splits:
        raise ValueError(f"mla_decode: splits={splits} must divide the {s // bt} chunks of the cache")


def combine(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Merge per-split partials o [B, P, N, C], lse [B, P, N] -> [B, N, C] (float32)."""
    m = lse.max(axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # [B, P, N], 0 for empty splits
    den = w.sum(axis=1)
    num = jnp.einsum("BPN,BPNC->BNC", w, o)
    return num / jnp.where(den == 0, 1.0, den)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "bh", "bt", "splits", "interpret", "num_warps",
                                             "num_stages"))
def mla_decode(q_lat, q_pe, c_kv, k_pe, lengths, *, sm_scale: float, kv_scale=None, bh: int = 16, bt: int = 64,
               splits: int = 1, interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
    """q_lat [B, N, C], q_pe [B, N, R]; cache c_kv [B, S, C], k_pe [B, S, R]; lengths [B]: attend to s < length.

    kv_scale: [2] float32 (c_kv, k_pe) when the cache is FP8. Returns [B, N, C] float32.
    """
    b, n, c = q_lat.shape
    s, r = c_kv.shape[1], k_pe.shape[2]
    check_shapes(b, n, c, r, s, bh, bt, splits)
    scale = jnp.ones((2,), F32) if kv_scale is None else jnp.asarray(kv_scale, F32).reshape(2)
    split = s // splits
    kernel = functools.partial(_kernel, bt=bt, split=split, sm_scale=sm_scale)
    whole = pl.BlockSpec()
    o, lse = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, splits, n, c), F32), jax.ShapeDtypeStruct((b, splits, n), F32)),
        grid=(b, n // bh, splits),
        in_specs=[whole, whole, pl.BlockSpec((None, bh, c), lambda i, h, p: (i, h, 0)),
                  pl.BlockSpec((None, bh, r), lambda i, h, p: (i, h, 0)), whole, whole],
        out_specs=[pl.BlockSpec((None, None, bh, c), lambda i, h, p: (i, p, h, 0)),
                   pl.BlockSpec((None, None, bh), lambda i, h, p: (i, p, h))],
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="mla_decode",
    )(lengths.astype(jnp.int32), scale, q_lat, q_pe, c_kv, k_pe)
    return combine(o, lse)


def mla_decode_reference(q_lat, q_pe, c_kv, k_pe, lengths, *, sm_scale: float, kv_scale=None):
    """Plain jnp: full scores, masked softmax, weighted latent sum. [B, N, C] float32."""
    sc, sr = (1.0, 1.0) if kv_scale is None else (kv_scale[0], kv_scale[1])
    kv, kr = c_kv.astype(F32) * sc, k_pe.astype(F32) * sr
    scores = (jnp.einsum("BNC,BSC->BNS", q_lat.astype(F32), kv) + jnp.einsum("BNR,BSR->BNS", q_pe.astype(F32), kr))
    scores = scores * sm_scale
    valid = jnp.arange(c_kv.shape[1])[None, None, :] < lengths[:, None, None]
    p = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    p = jnp.where(valid, p, 0.0)
    return jnp.einsum("BNS,BSC->BNC", p, kv)
