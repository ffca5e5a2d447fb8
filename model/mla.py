"""Multi-head latent attention (MLA) in its two forms.

- Naive (prefill): the latent is decompressed through `wk_b`/`wv_b` into per-head keys and values, then ordinary
  causal attention with query/key dim H+R and value dim V.
- Absorbed (decode): `wk_b` is folded into the query and `wv_b` into the output, so attention runs directly
  against the cache, which holds only the normalised latent c_kv [S, C] and the rotated rope key k_pe [S, R] per
  token per layer, shared by all heads (an MQA with key dim C+R and value dim C).

Both take the same projections (`project`), so their equivalence is a test of the absorption algebra alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.cache import kv_load
from model.config import Config
from model.layers import F32, qdot, rms_norm
from model.params import Attention
from model.rope import apply_rope
from pallas_kernels.ops import decode_attention, prefill_attention
from quant.qarray import weight

NEG_INF = -1e30  # finite: a fully masked row (padding) must not produce NaN


def project(p: Attention, x: jax.Array, positions: jax.Array, cfg: Config):
    """Low-rank query and key/value paths, with RoPE applied.

    Args: x: [B, T, D]; positions: [B, T].
    Returns: q_nope [B, T, N, H], q_pe [B, T, N, R], c_kv [B, T, C] (after kv_norm), k_pe [B, T, R] (rotated).
    """
    h, c = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    with jax.named_scope("down_proj"):
        c_q = qdot(x, p.wq_a, "BTD,DQ->BTQ")  # [B, T, Q]
        kv = qdot(x, p.wkv_a, "BTD,DK->BTK")  # [B, T, C+R]
    with jax.named_scope("q_proj"):
        c_q = rms_norm(c_q, p.q_norm, cfg.rms_norm_eps)
        q = qdot(c_q, p.wq_b, "BTQ,QNK->BTNK")  # [B, T, N, H+R]
        q_nope, q_pe = q[..., :h], apply_rope(q[..., h:], positions, cfg)
    with jax.named_scope("kv_proj"):
        c_kv = rms_norm(kv[..., :c], p.kv_norm, cfg.rms_norm_eps)  # [B, T, C]
        k_pe = apply_rope(kv[..., c:], positions, cfg)  # [B, T, R]
    return q_nope, q_pe, c_kv, k_pe


def _softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    scores = jnp.where(mask, scores, NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


def _per_shard(fn, plan, in_specs, out_spec):
    """fn as is, or under shard_map over the plan's batch and head axes: a Pallas kernel is one custom call,
    which the partitioner cannot split, so each device runs it on its own sequences and heads."""
    if plan.mesh is None:
        return fn
    return jax.shard_map(fn, mesh=plan.mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)


def attend_naive(p: Attention, q_nope, q_pe, c_kv, k_pe, mask: jax.Array, cfg: Config, plan) -> jax.Array:
    """Decompressed attention. q_*: [B, T, N, *]; c_kv: [B, S, C]; k_pe: [B, S, R]; mask: [B or 1, T, S]
    (causal, and within documents for packed rows). plan.attention "pallas": the causal flash-attention kernel
    (pallas_kernels/mla_prefill/), which applies the causal mask itself. Returns [B, T, D]."""
    with jax.named_scope("attend_naive"):
        k_nope = qdot(c_kv, p.wk_b, "BSC,NHC->BSNH")  # [B, S, N, H]
        v = qdot(c_kv, p.wv_b, "BSC,NCV->BSNV")  # [B, S, N, V]
        scale = cfg.softmax_scale
        if plan.attention == "pallas":
            b, n = plan.axes("batch") or None, plan.axes("heads") or None
            heads = P(b, None, n, None)
            fn = _per_shard(lambda *a: prefill_attention(*a, scale), plan,
                            (heads, heads, heads, P(b, None, None), heads), heads)
            o = fn(q_nope, q_pe, k_nope, k_pe, v).astype(v.dtype)
            return qdot(o, p.wo, "BTNV,NVD->BTD")
        scores = (jnp.einsum("BTNH,BSNH->BNTS", q_nope, k_nope, preferred_element_type=F32)
                  + jnp.einsum("BTNR,BSR->BNTS", q_pe, k_pe, preferred_element_type=F32)) * scale
        probs = _softmax(scores, mask[:, None]).astype(v.dtype)  # [B, N, T, S]
        o = jnp.einsum("BNTS,BSNV->BTNV", probs, v, preferred_element_type=F32).astype(v.dtype)
        return qdot(o, p.wo, "BTNV,NVD->BTD")


def _heads_first(x: jax.Array) -> jax.Array:
    """[B, T, N, K] -> [N, B*T, K]."""
    return jnp.swapaxes(x.reshape(-1, *x.shape[2:]), 0, 1)


def _heads_last(x: jax.Array, b: int) -> jax.Array:
    """[N, B*T, K] -> [B, T, N, K]."""
    return jnp.swapaxes(x, 0, 1).reshape(b, -1, *x.shape[::2])


def attend_absorbed(p: Attention, q_nope, q_pe, cache, positions, cfg: Config, plan) -> jax.Array:
    """Weight-absorbed attention against the latent cache, after this step's latents were written into it.

    q_nope: [B, T, N, H]; q_pe: [B, T, N, R]; cache: this layer's c_kv [B, S, C], k_pe [B, S, R] (FP8: 16-bit
    words with kv_scale [2]); positions: [B, T], each query sees the slots up to its own position.
    scores = (q_nope W_uk) . c_kv + q_pe . k_pe;  out = W_o (W_uv (sum_s p c_kv)).  Returns [B, T, D].
    plan.attention "pallas" (one token per sequence): the decode kernel (pallas_kernels/mla_decode/) over the raw
    cache, FP8 caches converted in the kernel.
    """
    with jax.named_scope("attend_absorbed"):
        # the per-head products run with the heads leading on both operands, rows M = B*T: written with the
        # heads between the rows, XLA:CPU ran them as a slow loop of small products once T > 1 or B > 1.
        # wk_b is contracted over H here, not its reduction axis C: no activation quantization for this product
        bsz, t, n, _ = q_nope.shape
        q_lat = jnp.einsum("NMH,NHC->NMC", _heads_first(q_nope), weight(p.wk_b, q_nope.dtype),
                           preferred_element_type=F32).astype(q_nope.dtype)
        q_lat = _heads_last(q_lat, bsz)  # [B, T, N, C]
        scale = cfg.softmax_scale
        if plan.attention == "pallas":
            bs, hs = plan.axes("batch") or None, plan.axes("heads") or None
            fn = _per_shard(lambda *a: decode_attention(*a, scale, cache.kv_scale), plan,
                            (P(bs, hs, None), P(bs, hs, None), P(bs, None, None), P(bs, None, None), P(bs)),
                            P(bs, hs, None))
            o_lat = fn(q_lat[:, 0], q_pe[:, 0], cache.c_kv, cache.k_pe, positions[:, 0] + 1)
            o = _heads_last(qdot(_heads_first(o_lat[:, None].astype(q_nope.dtype)), p.wv_b, "NMC,NCV->NMV"), bsz)
            return qdot(o, p.wo, "BTNV,NVD->BTD")
        dt = q_nope.dtype
        cache_c, cache_r = kv_load(cache.c_kv, cache.kv_scale, 0, dt), kv_load(cache.k_pe, cache.kv_scale, 1, dt)
        scores = (jnp.einsum("BTNC,BSC->BNTS", q_lat, cache_c, preferred_element_type=F32)
                  + jnp.einsum("BTNR,BSR->BNTS", q_pe, cache_r, preferred_element_type=F32)) * scale
        probs = _softmax(scores, cache_mask(positions, cache_c.shape[1])[:, None])  # [B, N, T, S]
        # probs [B, N*T, S] x values [B, S, C]: a plain batched matrix product over the cache in its stored layout
        # (contracting S on the cache's left made XLA:CPU run a transposed-operand product 6-10x slower)
        o_lat = jnp.einsum("BQS,BSC->BQC", probs.reshape(bsz, n * t, -1).astype(dt), cache_c,
                           preferred_element_type=F32)
        o_lat = o_lat.reshape(bsz, n, t, -1).swapaxes(1, 2).astype(dt)  # [B, T, N, C]
        o = _heads_last(qdot(_heads_first(o_lat), p.wv_b, "NMC,NCV->NMV"), bsz)  # [B, T, N, V]
        return qdot(o, p.wo, "BTNV,NVD->BTD")


def causal_mask(t: int) -> jax.Array:
    """[1, T, T]: query t sees keys s <= t. Right-padding needs no extra mask: pads only follow real tokens."""
    return jnp.tril(jnp.ones((t, t), bool))[None]


def cache_mask(positions: jax.Array, s: int) -> jax.Array:
    """[B, T, S]: query at position p sees cache slots s <= p (slots past a sequence's length are never seen)."""
    return jnp.arange(s)[None, None, :] <= positions[:, :, None]


def write_cache(cache: jax.Array, new: jax.Array, layer, start: jax.Array) -> jax.Array:
    """Write new [B, T, K] into layer `layer` of cache [L, B, S, K] at per-sequence offsets start [B]: a scatter
    of the B x T entries into the buffer, which XLA does in place (a donated or loop-carried buffer is never
    copied). Entries past the cache's end are dropped (callers check the room first)."""
    b, t = new.shape[:2]
    rows = jnp.arange(b)[:, None]
    slots = start[:, None] + jnp.arange(t)[None, :]  # [B, T]
    return cache.at[layer, rows, slots].set(new.astype(cache.dtype), mode="drop")
