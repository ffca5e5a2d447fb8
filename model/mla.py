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

from model.config import Config
from model.layers import F32, qdot, rms_norm
from model.params import Attention
from model.rope import apply_rope
from quant.qarray import weight

NEG_INF = -1e30  # finite: a fully masked row (padding) must not produce NaN


def project(p: Attention, x: jax.Array, positions: jax.Array, cfg: Config, tp_axis: str | None = None):
    """Low-rank query and key/value paths, with RoPE applied.

    Args: x: [B, T, D]; positions: [B, T]. tp_axis: inside sharding/tp.py's shard_map, where the down-projections
    wq_a and wkv_a may hold a column slice each (their outputs are then gathered whole, in one all-gather).
    Returns: q_nope [B, T, N, H], q_pe [B, T, N, R], c_kv [B, T, C] (after kv_norm), k_pe [B, T, R] (rotated).
    """
    h, c = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    with jax.named_scope("down_proj"):
        c_q = qdot(x, p.wq_a, "BTD,DQ->BTQ")  # [B, T, Q]
        kv = qdot(x, p.wkv_a, "BTD,DK->BTK")  # [B, T, C+R]
        if tp_axis is not None:
            c_q, kv = gather_columns((c_q, kv), (cfg.q_lora_rank, c + cfg.qk_rope_head_dim), tp_axis)
    with jax.named_scope("q_proj"):
        c_q = rms_norm(c_q, p.q_norm, cfg.rms_norm_eps)
        q = qdot(c_q, p.wq_b, "BTQ,QNK->BTNK")  # [B, T, N, H+R]
        q_nope, q_pe = q[..., :h], apply_rope(q[..., h:], positions, cfg)
    with jax.named_scope("kv_proj"):
        c_kv = rms_norm(kv[..., :c], p.kv_norm, cfg.rms_norm_eps)  # [B, T, C]
        k_pe = apply_rope(kv[..., c:], positions, cfg)  # [B, T, R]
    return q_nope, q_pe, c_kv, k_pe


def gather_columns(parts: tuple[jax.Array, ...], widths: tuple[int, ...], axis: str) -> tuple[jax.Array, ...]:
    """Outputs [..., W] of products whose weights may hold a column slice each on every device of mesh axis `axis`
    (a part narrower than its whole width W is a slice) -> the whole outputs, with one all-gather for all the
    slices rather than one each: on a CPU a collective costs tens of microseconds."""
    sliced = [i for i, (a, w) in enumerate(zip(parts, widths)) if a.shape[-1] != w]
    if not sliced:
        return parts
    local = jnp.concatenate([parts[i] for i in sliced], -1)  # [..., sum of slice widths]
    every = jax.lax.all_gather(local, axis, axis=local.ndim - 1)  # [..., devices, sum of slice widths]
    out, at = list(parts), 0
    for i in sliced:
        w = parts[i].shape[-1]
        whole = every[..., at:at + w]
        out[i] = whole.reshape(*whole.shape[:-2], -1)  # device-major: the devices' slices side by side
        at += w
    return tuple(out)


def _softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    scores = jnp.where(mask, scores, NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


def attend_naive(p: Attention, q_nope, q_pe, c_kv, k_pe, mask: jax.Array, scale: float,
                 backend: str = "xla") -> jax.Array:
    """Decompressed attention. q_*: [B, T, N, *]; c_kv: [B, S, C]; k_pe: [B, S, R]; mask: [B, T, S] (causal).

    backend "pallas": the causal flash-attention kernel (pallas_kernels/mla_prefill/). Returns [B, T, D].
    """
    with jax.named_scope("attend_naive"):
        k_nope = qdot(c_kv, p.wk_b, "BSC,NHC->BSNH")  # [B, S, N, H]
        v = qdot(c_kv, p.wv_b, "BSC,NCV->BSNV")  # [B, S, N, V]
        if backend == "pallas":
            from pallas_kernels.ops import prefill_attention
            o = prefill_attention(q_nope, q_pe, k_nope, k_pe, v, scale).astype(v.dtype)
            return qdot(o, p.wo, "BTNV,NVD->BTD")
        scores = (jnp.einsum("BTNH,BSNH->BNTS", q_nope, k_nope, preferred_element_type=F32)
                  + jnp.einsum("BTNR,BSR->BNTS", q_pe, k_pe, preferred_element_type=F32)) * scale
        probs = _softmax(scores, mask[:, None]).astype(v.dtype)  # [B, N, T, S]
        o = jnp.einsum("BNTS,BSNV->BTNV", probs, v, preferred_element_type=F32).astype(v.dtype)
        return qdot(o, p.wo, "BTNV,NVD->BTD")


def attend_absorbed(p: Attention, q_nope, q_pe, cache_c, cache_r, mask: jax.Array, scale: float,
                    backend: str = "xla", lengths=None, kv_scale=None, new=None) -> jax.Array:
    """Weight-absorbed attention against the latent cache.

    q_nope: [B, T, N, H]; q_pe: [B, T, N, R]; cache_c: [B, S, C]; cache_r: [B, S, R]; mask: [B, T, S].
    scores = (q_nope W_uk) . c_kv + q_pe . k_pe;  out = W_o (W_uv (sum_s p c_kv)).  Returns [B, T, D].
    backend "pallas" (one token per sequence): the decode kernel (pallas_kernels/mla_decode/) over the raw
    cache, visible positions s < lengths [B], FP8 caches dequantized in the kernel with kv_scale [2].
    new: (c_kv [B, T, C], k_pe [B, T, R]) of the T query tokens themselves, attended causally in one softmax with
    the cache slots the mask shows (xla backend): decode then reads the cache before this step's write.
    """
    with jax.named_scope("attend_absorbed"):
        # wk_b is contracted over H here, not its reduction axis C: no activation quantization for this product
        q_lat = jnp.einsum("BTNH,NHC->BTNC", q_nope, weight(p.wk_b, q_nope.dtype),
                           preferred_element_type=F32).astype(q_nope.dtype)  # [B, T, N, C]
        if backend == "pallas":
            if q_nope.shape[1] != 1:
                raise ValueError("the pallas decode kernel takes one token per sequence")
            from pallas_kernels.ops import decode_attention
            o_lat = decode_attention(q_lat[:, 0], q_pe[:, 0], cache_c, cache_r, lengths, scale, kv_scale)
            o = qdot(o_lat[:, None].astype(q_nope.dtype), p.wv_b, "BTNC,NCV->BTNV")
            return qdot(o, p.wo, "BTNV,NVD->BTD")
        scores = (jnp.einsum("BTNC,BSC->BNTS", q_lat, cache_c, preferred_element_type=F32)
                  + jnp.einsum("BTNR,BSR->BNTS", q_pe, cache_r, preferred_element_type=F32)) * scale
        visible = mask[:, None]  # [B, 1, T, S]
        s_len = scores.shape[-1]
        if new is not None:  # the T new tokens as T more keys, each seen by itself and the queries after it
            new_c, new_r = new
            scores = jnp.concatenate([scores, (jnp.einsum("BTNC,BUC->BNTU", q_lat, new_c, preferred_element_type=F32)
                                               + jnp.einsum("BTNR,BUR->BNTU", q_pe, new_r,
                                                            preferred_element_type=F32)) * scale], -1)
            t = q_nope.shape[1]
            visible = jnp.concatenate([jnp.broadcast_to(visible, (*visible.shape[:3], s_len)),
                                       jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (*visible.shape[:2], t, t))],
                                      -1)
        probs = _softmax(scores, visible)  # [B, N, T, S (+T)]

        def weighted(v, pr):  # values [B, S, C] (the cache as the left operand, in its stored layout) x probs
            # [B, N, T, S] -> [B, T, N, C]. Contracting the cache's S axis from the right made XLA:CPU copy the
            # cache transposed every layer and step; transposing the probabilities instead is cheap.
            b, n, t, _ = pr.shape
            pr = jnp.moveaxis(pr, 3, 1).reshape(b, -1, n * t).astype(v.dtype)  # [B, S, N*T]
            o = jax.lax.dot_general(v, pr, (((1,), (1,)), ((0,), (0,))), preferred_element_type=F32)  # [B, C, N*T]
            return jnp.moveaxis(o.reshape(b, -1, n, t), 1, 3).swapaxes(1, 2)  # [B, T, N, C]

        o_lat = weighted(cache_c, probs[..., :s_len])
        if new is not None:
            o_lat = o_lat + weighted(new_c, probs[..., s_len:])
        o_lat = o_lat.astype(q_nope.dtype)
        o = qdot(o_lat, p.wv_b, "BTNC,NCV->BTNV")  # [B, T, N, V]
        return qdot(o, p.wo, "BTNV,NVD->BTD")


def causal_mask(t: int) -> jax.Array:
    """[1, T, T]: query t sees keys s <= t. Right-padding needs no extra mask: pads only follow real tokens."""
    return jnp.tril(jnp.ones((t, t), bool))[None]


def cache_mask(positions: jax.Array, s: int) -> jax.Array:
    """[B, T, S]: query at position p sees cache slots s <= p (slots past a sequence's length are never seen)."""
    return jnp.arange(s)[None, None, :] <= positions[:, :, None]


def write_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [B, T, K] into cache [B, S, K] at per-sequence offsets start [B]."""
    def one(c, n, s):
        return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0))
    return jax.vmap(one)(cache, new, start)
