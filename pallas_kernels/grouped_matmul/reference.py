"""The grouped matmul in plain jnp: dequantize, then each row times its group's matrix (float32 accumulation).
Slow and obviously right; the kernel is tested against it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from quant.qarray import dequantize, is_qarray

F32 = jnp.float32


def grouped_matmul_reference(x, w, group_sizes, w_up=None, expert_offset=0):
    """Same contract as `grouped_matmul`: x [M, K]; w, w_up [G', K, N] (plain or quant.QArray); group g uses
    matrix expert_offset + g; rows past sum(group_sizes) are zeros. Returns [M, N] in x's dtype."""
    def dense(v):  # logical [G', K, N] in float32
        return dequantize(v, F32) if is_qarray(v) else v.astype(F32)
    m = x.shape[0]
    ends = jnp.cumsum(group_sizes)
    valid = jnp.arange(m) < ends[-1]
    gid = jnp.minimum(jnp.searchsorted(ends, jnp.arange(m), side="right"), group_sizes.shape[0] - 1)
    gid = gid + expert_offset
    y = jnp.einsum("MK,MKN->MN", x.astype(F32), dense(w)[gid])
    if w_up is not None:
        y = jax.nn.silu(y) * jnp.einsum("MK,MKN->MN", x.astype(F32), dense(w_up)[gid])
    return jnp.where(valid[:, None], y, 0).astype(x.dtype)
