"""MLA prefill attention in plain jnp: full causal scores, a masked softmax, the weighted values."""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def mla_prefill_reference(q_nope, q_pe, k_nope, k_pe, v, lengths, *, sm_scale: float):
    """Same contract as `mla_prefill`. Returns [B, T, N, V] in v's dtype (zeros at padded query rows)."""
    t = q_nope.shape[1]
    s = (jnp.einsum("BTNH,BSNH->BNTS", q_nope.astype(F32), k_nope.astype(F32))
         + jnp.einsum("BTNR,BSR->BNTS", q_pe.astype(F32), k_pe.astype(F32))) * sm_scale
    pos = jnp.arange(t)
    mask = (pos[None, :] <= pos[:, None])[None, None] & (pos < lengths[:, None])[:, None, None, :]
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    o = jnp.einsum("BNTS,BSNV->BTNV", jnp.nan_to_num(p), v.astype(F32))
    return jnp.where((pos[None, :] < lengths[:, None])[..., None, None], o, 0.0).astype(v.dtype)
