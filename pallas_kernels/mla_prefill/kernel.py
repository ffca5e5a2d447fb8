"""MLA prefill attention (the decompressed form) as causal flash attention on Triton.

    out[b, t, n] = softmax_s(scale * (q_nope . k_nope[s, n] + q_pe . k_pe[s]), s <= t, s < length[b]) . v[s, n]

Query/key dim H + R (128 + 64 in DeepSeek-V3; the halves travel as separate operands because Triton tiles are
powers of two and 192 is not one), value dim V (128); the rope key k_pe [B, T, R] is shared by all heads. Grid
(B, N, T / bq): each program walks the key blocks up to its last query row (causal) and the sequence's length
(ragged batches) with an online softmax in float32. Dots run on the inputs' dtype (bf16 in production) with
float32 accumulation; the probabilities are cast to the values' dtype for the second one. Query rows at or past a
sequence's length (right padding) come back as zeros.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import F32, check_offsets, check_smem, check_tile, interpret_default, largest_tile

NAME = "mla_prefill"
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """bq query rows per program, bk key rows per step; Triton's warps and stages."""

    bq: int = 64
    bk: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def get_default(cls, *, length: int) -> BlockSizes:
        """128 query rows x 64 key rows, 8 warps and 3 stages (FlashAttention-2's Hopper tiles for head dims near
        128) where the padded length allows; smaller powers of two dividing it otherwise."""
        bq, bk = largest_tile(length, 128), largest_tile(length, 64)
        return cls(bq=bq, bk=bk, num_warps=8 if bq >= 128 else 4, num_stages=3 if bq >= 128 else 2)


def smem_bytes(bs: BlockSizes, *, qk_dim: int, rope: int, v_dim: int, itemsize: int) -> int:
    """Shared memory of one block: the key, rope-key and value tiles buffered num_stages times; the query tile
    and the probabilities (the second dot's operand) once."""
    per_stage = bs.bk * (qk_dim + rope + v_dim) * itemsize
    return bs.num_stages * per_stage + bs.bq * (qk_dim + rope) * itemsize + bs.bq * bs.bk * itemsize


def _kernel(len_ref, qn_ref, qr_ref, kn_ref, kr_ref, v_ref, o_ref, *, bq: int, bk: int, sm_scale: float):
    b, n, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    q0 = t * bq
    qn, qr = qn_ref[...], qr_ref[...]  # [bq, H], [bq, R] in the inputs' dtype
    rows = q0 + jnp.arange(bq)
    kv_end = jnp.minimum(q0 + bq, length)  # causal, and nothing past the length
    n_blocks = (jnp.maximum(kv_end, 0) + bk - 1) // bk

    def body(i, carry):
        m, l, acc = carry
        s0 = pl.multiple_of(i * bk, bk)
        kn = kn_ref[b, pl.ds(s0, bk), n, :]  # [bk, H]
        kr = kr_ref[b, pl.ds(s0, bk), :]  # [bk, R]
        v = v_ref[b, pl.ds(s0, bk), n, :]  # [bk, V]
        s = (jax.lax.dot_general(qn, kn.astype(qn.dtype), (((1,), (1,)), ((), ())), preferred_element_type=F32)
             + jax.lax.dot_general(qr, kr.astype(qr.dtype), (((1,), (1,)), ((), ())), preferred_element_type=F32))
        s = s * sm_scale
        cols = s0 + jnp.arange(bk)
        s = jnp.where((cols[None, :] <= rows[:, None]) & (cols < length)[None, :], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=F32)
        return m_new, l * alpha + p.sum(axis=1), acc * alpha[:, None] + pv

    init = (jnp.full((bq,), NEG_INF, F32), jnp.zeros((bq,), F32), jnp.zeros((bq, v_ref.shape[-1]), F32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    ok = (rows < length) & (l > 0)
    o_ref[...] = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)


def check_shapes(t: int, h: int, r: int, v: int, bs: BlockSizes) -> None:
    for name, x in (("bq", bs.bq), ("bk", bs.bk), ("qk nope dim", h), ("rope dim", r), ("value dim", v)):
        check_tile(NAME, name, x)
    if t % bs.bq or t % bs.bk:
        raise ValueError(f"{NAME}: the padded prompt length {t} must be a multiple of bq={bs.bq} and bk={bs.bk}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret", "debug"))
def mla_prefill(q_nope, q_pe, k_nope, k_pe, v, lengths, *, sm_scale: float, block_sizes: BlockSizes | None = None,
                interpret: bool | None = None, debug: bool = False):
    """q_nope, k_nope [B, T, N, H]; q_pe [B, T, N, R]; k_pe [B, T, R]; v [B, T, N, V]; lengths [B].

    Returns [B, T, N, V] in v's dtype (zeros at padded query rows)."""
    b, t, n, h = q_nope.shape
    r, vd = q_pe.shape[-1], v.shape[-1]
    bs = block_sizes or BlockSizes.get_default(length=t)
    check_shapes(t, h, r, vd, bs)
    check_smem(NAME, smem_bytes(bs, qk_dim=h, rope=r, v_dim=vd, itemsize=q_nope.dtype.itemsize), bs)
    out_shape = jax.ShapeDtypeStruct((b, t, n, vd), v.dtype)
    check_offsets(NAME, {"q_nope": q_nope, "q_pe": q_pe, "k_nope": k_nope, "k_pe": k_pe, "v": v,
                         "output": out_shape})
    whole = pl.BlockSpec()
    return pl.pallas_call(
        functools.partial(_kernel, bq=bs.bq, bk=bs.bk, sm_scale=sm_scale),
        out_shape=out_shape,
        grid=(b, n, t // bs.bq),
        in_specs=[whole, pl.BlockSpec((None, bs.bq, None, h), lambda i, j, k: (i, k, j, 0)),
                  pl.BlockSpec((None, bs.bq, None, r), lambda i, j, k: (i, k, j, 0)), whole, whole, whole],
        out_specs=pl.BlockSpec((None, bs.bq, None, vd), lambda i, j, k: (i, k, j, 0)),
        interpret=interpret_default() if interpret is None else interpret,
        debug=debug,
        compiler_params=plt.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        name=NAME,
    )(lengths.astype(jnp.int32), q_nope, q_pe, k_nope, k_pe, v)
