"""MLA prefill attention (the naive, decompressed form) as causal flash attention in Pallas.

Per head: query/key dim H + R (128 + 64 in DeepSeek-V3; the two halves travel as separate operands because Triton
needs power-of-two sizes and 192 is not one), value dim V (128); the rope key k_pe [B, T, R] is shared by all
heads. Grid (B, N, T / bq): each program walks the key blocks up to its last query row (causal) and the
sequence's length (ragged batches), with an online softmax in float32. Query rows at or past a sequence's length
(right padding) come back as zeros. `mla_prefill_reference` is the plain-jnp twin.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32
NEG_INF = float("-inf")


def _kernel(len_ref, qn_ref, qr_ref, kn_ref, kr_ref, v_ref, o_ref, *, bq: int, bk: int, sm_scale: float):
    b, n, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    q0 = t * bq
    qn = qn_ref[...].astype(F32)  # [bq, H]
    qr = qr_ref[...].astype(F32)  # [bq, R]
    rows = q0 + jnp.arange(bq)
    kv_end = jnp.minimum(q0 + bq, length)  # causal, and nothing past the length
    n_blocks = (jnp.maximum(kv_end, 0) + bk - 1) // bk

    def body(i, carry):
        m, l, acc = carry
        s0 = pl.multiple_of(i * bk, bk)
        kn = kn_ref[b, pl.ds(s0, bk), n, :].astype(F32)  # [bk, H]
        kr = kr_ref[b, pl.ds(s0, bk), :].astype(F32)  # [bk, R]
        v = v_ref[b, pl.ds(s0, bk), n, :].astype(F32)  # [bk, V]
        s = (jax.lax.dot_general(qn, kn, (((1,), (1,)), ((), ())), preferred_element_type=F32)
             + jax.lax.dot_general(qr, kr, (((1,), (1,)), ((), ())), preferred_element_type=F32)) * sm_scale
        cols = s0 + jnp.arange(bk)
        s = jnp.where((cols[None, :] <= rows[:, None]) & (cols < length)[None, :], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        return m_new, l * alpha + p.sum(axis=1), acc * alpha[:, None] + jax.lax.dot_general(
            p, v, (((1,), (0,)), ((), ())), preferred_element_type=F32)

    init = (jnp.full((bq,), NEG_INF, F32), jnp.zeros((bq,), F32), jnp.zeros((bq, v_ref.shape[-1]), F32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    ok = (rows < length) & (l > 0)
    o_ref[...] = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)


def check_shapes(t: int, h: int, r: int, v: int, bq: int, bk: int) -> None:
    for name, x in (("bq", bq), ("bk", bk), ("qk nope dim", h), ("rope dim", r), ("value dim", v)):
        if x < 16 or x & (x - 1):
            raise ValueError(f"mla_prefill: {name}={x} must be a power of two >= 16 (Triton tiles)")
    if t % bq or t % bk:
        raise ValueError(f"mla_prefill: the padded prompt length {t} must be a multiple of bq={bq} and bk={bk}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "bq", "bk", "interpret", "num_warps", "num_stages"))
def mla_prefill(q_nope, q_pe, k_nope, k_pe, v, lengths, *, sm_scale: float, bq: int = 64, bk: int = 64,
                interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
    """q_nope, k_nope [B, T, N, H]; q_pe [B, T, N, R]; k_pe [B, T, R]; v [B, T, N, V]; lengths [B].

    Returns [B, T, N, V] in v's dtype (zeros at padded query rows).
    """
    b, t, n, h = q_nope.shape
    r, vd = q_pe.shape[-1], v.shape[-1]
    check_shapes(t, h, r, vd, bq, bk)
    whole = pl.BlockSpec()
    return pl.pallas_call(
        functools.partial(_kernel, bq=bq, bk=bk, sm_scale=sm_scale),
        out_shape=jax.ShapeDtypeStruct((b, t, n, vd), v.dtype),
        grid=(b, n, t // bq),
        in_specs=[whole, pl.BlockSpec((None, bq, None, h), lambda i, j, k: (i, k, j, 0)),
                  pl.BlockSpec((None, bq, None, r), lambda i, j, k: (i, k, j, 0)), whole, whole, whole],
        out_specs=pl.BlockSpec((None, bq, None, vd), lambda i, j, k: (i, k, j, 0)),
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="mla_prefill",
    )(lengths.astype(jnp.int32), q_nope, q_pe, k_nope, k_pe, v)


def mla_prefill_reference(q_nope, q_pe, k_nope, k_pe, v, lengths, *, sm_scale: float):
    t = q_nope.shape[1]
    s = (jnp.einsum("BTNH,BSNH->BNTS", q_nope.astype(F32), k_nope.astype(F32))
         + jnp.einsum("BTNR,BSR->BNTS", q_pe.astype(F32), k_pe.astype(F32))) * sm_scale
    pos = jnp.arange(t)
    mask = (pos[None, :] <= pos[:, None])[None, None] & (pos < lengths[:, None])[:, None, None, :]
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    o = jnp.einsum("BNTS,BSNV->BTNV", jnp.nan_to_num(p), v.astype(F32))
    return jnp.where((pos[None, :] < lengths[:, None])[..., None, None], o, 0.0).astype(v.dtype)
