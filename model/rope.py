"""Rotary position embedding with YaRN frequency scaling, DeepSeek's interleaved-pair layout.

DeepSeek's weights rotate interleaved pairs (dims 2i, 2i+1 form one complex number); we keep that layout end to
end (queries, keys and the cached rope key), so checkpoints load unpermuted. HF transformers writes the rotated
output de-interleaved instead; q.k is identical either way (tested against HF in tests/test_reference_parity.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from model.config import Config, yarn_get_mscale


def _correction_dim(n_rot: float, dim: int, base: float, l0: int) -> float:
    return dim * math.log(l0 / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(cfg: Config) -> np.ndarray:
    """Per-pair inverse frequencies [R/2], float32, with YaRN's ramp between extrapolated and interpolated."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_extra = (np.float32(1.0) / pos_freqs).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_extra
    inv_inter = (np.float32(1.0) / (np.float32(rs.factor) * pos_freqs)).astype(np.float32)
    low = max(math.floor(_correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001  # guard the ramp's division
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extra_factor = np.float32(1) - ramp
    return (inv_inter * (1 - extra_factor) + inv_extra * extra_factor).astype(np.float32)


def rope_attention_factor(cfg: Config) -> float:
    """YaRN's scale on cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for R1)."""
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.mscale and rs.mscale_all_dim:
        return yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_get_mscale(rs.factor)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: Config) -> jax.Array:
    """Rotate interleaved pairs of the last axis, in float32.

    Args: x: [B, T, ..., R]; positions: [B, T] int. Returns x's shape and dtype.
    """
    inv_freq = jnp.asarray(rope_inv_freq(cfg))  # [R/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    extra = x.ndim - positions.ndim - 1
    angles = angles.reshape(*angles.shape[:2], *([1] * extra), angles.shape[-1])
    factor = rope_attention_factor(cfg)
    cos, sin = jnp.cos(angles) * factor, jnp.sin(angles) * factor
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
