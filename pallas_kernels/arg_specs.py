"""The kernels' arguments at DeepSeek-V3's sizes for one layer, as ShapeDtypeStructs (nothing allocated): what the
tests lower for CUDA and inspect, and what scripts/gpu_check.py fills with random values. Sizes are keywords, so
the same builders give the reduced shapes of a dry run.

DeepSeek-V3 / R1: 256 routed experts, top-8, hidden 7168, expert width 2048; 128 heads, latent 512 + rope 64,
no-rope query/key 128, value 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from quant.qarray import quantize

SD = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
DEEPSEEK = {"experts": 256, "top_k": 8, "hidden": 7168, "width": 2048, "heads": 128, "latent": 512, "rope": 64,
            "nope": 128, "v": 128}


def expert_weights(fmt: str = "bf16", *, experts: int = 256, hidden: int = 7168, width: int = 2048,
                   down: bool = False, dtype=BF16):
    """One layer's [E, K, N] stack (gate or up: K = hidden, N = width; down: the reverse), plain ("bf16": in
    `dtype`) or the abstract quant.QArray of the format ("fp8", "nvfp4", "mxfp4") quantized from `dtype`."""
    k, n = (width, hidden) if down else (hidden, width)
    w = SD((experts, k, n), dtype)
    if fmt == "bf16":
        return w
    return jax.eval_shape(lambda w: quantize(w, fmt, k_axis=-2, batch_ndim=1), w)


def expert_rows(tokens: int = 64, *, top_k: int = 8, experts: int = 256, hidden: int = 7168):
    """(x [tokens * top_k, hidden] bf16, group sizes [experts] int32): the grouped matmul's other arguments."""
    return SD((tokens * top_k, hidden), BF16), SD((experts,), jnp.int32)


def decode(batch: int = 32, heads: int = 128, cache_len: int = 4096, *, fp8: bool = False, latent: int = 512,
           rope: int = 64):
    """mla_decode's arguments: q_lat, q_pe, c_kv, k_pe, lengths (and kv_scale with an FP8 cache, whose codes come
    two per 16-bit word)."""
    q = (SD((batch, heads, latent), BF16), SD((batch, heads, rope), BF16))
    lengths = SD((batch,), jnp.int32)
    if fp8:
        return (*q, SD((batch, cache_len, latent // 2), jnp.uint16), SD((batch, cache_len, rope // 2), jnp.uint16),
                lengths, SD((2,), jnp.float32))
    return (*q, SD((batch, cache_len, latent), BF16), SD((batch, cache_len, rope), BF16), lengths)


def prefill(batch: int = 1, length: int = 4096, heads: int = 128, *, nope: int = 128, rope: int = 64, v: int = 128):
    """mla_prefill's arguments: q_nope, q_pe, k_nope, k_pe, v, lengths."""
    return (SD((batch, length, heads, nope), BF16), SD((batch, length, heads, rope), BF16),
            SD((batch, length, heads, nope), BF16), SD((batch, length, rope), BF16),
            SD((batch, length, heads, v), BF16), SD((batch,), jnp.int32))
