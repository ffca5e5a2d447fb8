"""MLA decode attention in plain jnp: full scores, a masked softmax, the weighted latent sum."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from quant.formats import unpack_bytes

F32 = jnp.float32


def mla_decode_reference(q_lat, q_pe, c_kv, k_pe, lengths, *, sm_scale: float, kv_scale=None):
    """Same contract as `mla_decode` (an FP8 cache as uint16 words with kv_scale). Returns [B, N, C] float32."""
    if kv_scale is None:
        kv, kr = c_kv.astype(F32), k_pe.astype(F32)
    else:
        kv = unpack_bytes(c_kv).astype(F32) * kv_scale[0]
        kr = unpack_bytes(k_pe).astype(F32) * kv_scale[1]
    scores = jnp.einsum("BNC,BSC->BNS", q_lat.astype(F32), kv) + jnp.einsum("BNR,BSR->BNS", q_pe.astype(F32), kr)
    valid = jnp.arange(kv.shape[1])[None, None, :] < lengths[:, None, None]
    p = jax.nn.softmax(jnp.where(valid, scores * sm_scale, -jnp.inf), axis=-1)
    return jnp.einsum("BNS,BSC->BNC", jnp.where(valid, p, 0.0), kv)
