"""The model's Pallas backend: the kernels behind the same interfaces as the XLA paths of model/mla.py and
model/moe.py, with the layout work (padding heads and the rope dim to the kernels' 16-wide tiles, choosing tiles
that divide the model's sizes). Kernels run compiled on a GPU and in interpret mode elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.mla_prefill import mla_prefill
from quant.qarray import is_qarray, map_leading, quantize_activation, quantizes_activation

F32 = jnp.float32


def interpret() -> bool:
    return jax.default_backend() != "gpu"


def _tile(n: int, cap: int = 64, what: str = "dimension") -> int:
    """The largest power of two in [16, cap] dividing n."""
    t = cap
    while t >= 16:
        if n % t == 0:
            return t
        t //= 2
    raise ValueError(f"the pallas backend needs the {what} ({n}) to be a multiple of 16")


def _pad_last(x, to: int):
    return x if x.shape[-1] >= to else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, to - x.shape[-1])])


def decode_attention(q_lat, q_pe, cache_c, cache_r, lengths, sm_scale: float, kv_scale=None):
    """q_lat [B, N, C], q_pe [B, N, R]; cache [B, S, C] / [B, S, R]; lengths [B] = visible positions.

    Returns the attention-weighted latent [B, N, C] float32 (W_uv and W_o are applied by the caller)."""
    n = q_lat.shape[1]
    s = cache_c.shape[1]
    bt = _tile(s, 64, "cache length")
    n_pad = -(-n // 16) * 16  # heads in 16-row tiles (Triton's smallest dot)
    q_lat = jnp.pad(q_lat, ((0, 0), (0, n_pad - n), (0, 0)))
    q_pe = _pad_last(jnp.pad(q_pe, ((0, 0), (0, n_pad - n), (0, 0))), 16)
    cache_r = _pad_last(cache_r, 16)  # only models with a rope dim under 16 (test configs) pay this copy
    splits = 1
    for cand in (8, 4, 2):
        if (s // bt) % cand == 0 and s // bt >= 2 * cand:
            splits = cand
            break
    out = mla_decode(q_lat, q_pe, cache_c, cache_r, lengths, sm_scale=sm_scale, kv_scale=kv_scale, bh=16, bt=bt,
                     splits=splits, interpret=interpret())
    return out[:, :n]


def prefill_attention(q_nope, q_pe, k_nope, k_pe, v, sm_scale: float):
    """Causal attention over T tokens (right padding is harmless under the causal mask). [B, T, N, V]."""
    b, t = q_nope.shape[:2]
    t_pad = -(-t // 16) * 16
    if t_pad != t:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, t_pad - t)] + [(0, 0)] * (x.ndim - 2))
        q_nope, q_pe, k_nope, k_pe, v = map(pad, (q_nope, q_pe, k_nope, k_pe, v))
    q_pe, k_pe = _pad_last(q_pe, 16), _pad_last(k_pe, 16)
    blk = _tile(t_pad, 64, "padded prompt length")
    lengths = jnp.full((b,), t, jnp.int32)
    out = mla_prefill(q_nope, q_pe, k_nope, k_pe, v, lengths, sm_scale=sm_scale, bq=blk, bk=blk,
                      interpret=interpret())
    return out[:, :t]


def moe_experts(we1, we3, we2, x, w, idx, layer=None) -> jax.Array:
    """Routed experts with the grouped-matmul kernel: sort the (token, expert) pairs by expert, fused gate/up
    SwiGLU, down projection, weighted scatter-add back. x: [T, D] -> [T, D] float32."""
    for v in (we1, we2):
        if quantizes_activation(v) and (not is_qarray(v) or v.input_scale is None):
            raise ValueError("the pallas backend quantizes expert activations with static (calibrated) input "
                             "scales; pass quant.calibrate's scales to quantize_params, or use backend='xla'")
    t, k = idx.shape
    n_exp = we1.shape[0 if layer is None else 1]
    if layer is None:
        w1, w3, w2, off = we1, we3, we2, 0
    else:
        w1, w3, w2 = (map_leading(lambda a: a.reshape(-1, *a.shape[2:]), v) for v in (we1, we3, we2))
        off = layer * n_exp
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=n_exp).astype(jnp.int32)
    xs = x[token]  # [T*X, D]
    d, m = we1.shape[-2], we1.shape[-1]
    if quantizes_activation(w1):  # per row, its expert's static input scale
        xs = quantize_activation(xs, w1.act, w1.input_scale[off + flat[order]], batch_ndim=1)
    bm = 16 if t * k <= 256 else 64
    h = grouped_matmul(xs, w1, sizes, w3, off, bm=bm, bn=_tile(m, 64, "expert width"),
                       bk=_tile(d, 64, "hidden size"), interpret=interpret())
    if quantizes_activation(w2):
        h = quantize_activation(h, w2.act, w2.input_scale[off + flat[order]], batch_ndim=1)
    y = grouped_matmul(h, w2, sizes, None, off, bm=bm, bn=_tile(d, 64, "hidden size"),
                       bk=_tile(m, 64, "expert width"), interpret=interpret())
    y = y.astype(F32) * w.reshape(-1)[order][:, None]
    return jnp.zeros((t, x.shape[1]), F32).at[token].add(y)
