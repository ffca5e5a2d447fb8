"""The model's Pallas backend: the kernels behind the same interfaces as the XLA paths of model/mla.py and
model/moe.py, with the layout work (heads and the rope dim padded to the kernels' 16-wide tiles, the prompt padded
to a multiple of 16). Tile sizes follow each kernel's `BlockSizes.get_default`. Kernels run compiled on a GPU and
in interpret mode elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.mla_prefill import mla_prefill
from quant.qarray import is_qarray, quantize_activation, quantizes_activation

F32 = jnp.float32


def _pad_axis(x, axis: int, to: int):
    if x.shape[axis] >= to:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, widths)


def decode_attention(q_lat, q_pe, cache_c, cache_r, lengths, sm_scale: float, kv_scale=None):
    """q_lat [B, N, C], q_pe [B, N, R]; cache [B, S, C] / [B, S, R] (an FP8 cache: uint16 words [B, S, C/2] /
    [B, S, R/2] with kv_scale [2]); lengths [B] = visible positions.

    Returns the attention-weighted latent [B, N, C] float32 (W_uv and W_o are applied by the caller)."""
    n = q_lat.shape[1]
    n_pad = -(-n // 16) * 16  # heads in 16-row tiles (Triton's smallest dot)
    q_lat = _pad_axis(q_lat, 1, n_pad)
    q_pe = _pad_axis(_pad_axis(q_pe, 1, n_pad), 2, 16)
    # only models with a rope dim under 16 (test configs) pay this copy of the rope cache
    cache_r = _pad_axis(cache_r, 2, 8 if kv_scale is not None else 16)
    out = mla_decode(q_lat, q_pe, cache_c, cache_r, lengths, sm_scale=sm_scale, kv_scale=kv_scale)
    return out[:, :n]


def prefill_attention(q_nope, q_pe, k_nope, k_pe, v, sm_scale: float):
    """Causal attention over T tokens (right padding is harmless under the causal mask). [B, T, N, V]."""
    b, t = q_nope.shape[:2]
    t_pad = -(-t // 16) * 16
    q_nope, q_pe, k_nope, k_pe, v = (_pad_axis(a, 1, t_pad) for a in (q_nope, q_pe, k_nope, k_pe, v))
    q_pe, k_pe = _pad_axis(q_pe, q_pe.ndim - 1, 16), _pad_axis(k_pe, k_pe.ndim - 1, 16)
    out = mla_prefill(q_nope, q_pe, k_nope, k_pe, v, jnp.full((b,), t, jnp.int32), sm_scale=sm_scale)
    return out[:, :t]


def grouped_swiglu(xs, we1, we3, we2, sizes, offset, row_expert) -> jax.Array:
    """Expert SwiGLU MLPs over rows sorted by expert with the grouped-matmul kernel: the fused gate/up product,
    then the down projection. xs: [R, D] rows; we1/we3 [G', D, M], we2 [G', M, D] (plain or quant.QArray stacks,
    group g at offset + g); sizes: [G] rows per group (rows past their sum come back as zeros); row_expert: [R]
    each row's group, for its expert's static input scale when activations are quantized. Returns [R, D]."""
    for v in (we1, we2):
        if quantizes_activation(v) and (not is_qarray(v) or v.input_scale is None):
            raise ValueError("the pallas experts quantize activations with static (calibrated) input scales; "
                             "pass model.calibrate's scales to quantize_params, or use experts='grouped'")
    if quantizes_activation(we1):  # per row, its expert's static input scale
        xs = quantize_activation(xs, we1.act, we1.input_scale[offset + row_expert], batch_ndim=1)
    h = grouped_matmul(xs, we1, sizes, we3, offset)
    if quantizes_activation(we2):
        h = quantize_activation(h, we2.act, we2.input_scale[offset + row_expert], batch_ndim=1)
    return grouped_matmul(h, we2, sizes, None, offset)
