"""DeepSeekMoE: sigmoid router with group-limited top-k (noaux_tc), routed SwiGLU experts, one shared expert.

Routed experts are never computed densely in the model:
- `experts_gather` (few tokens, i.e. decode): gathers only the selected experts' weights, [T, X, D, M].
- `experts_grouped` (prefill): sorts the (token, expert) pairs by expert and runs a grouped matmul over row tiles;
  every work item reads one expert's weights for one tile of rows, so each used expert is read once per tile.
`experts_dense_reference` computes every expert for every token and masks: obviously correct, for tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.config import Config
from model.layers import F32, swiglu
from model.params import Moe


def route(p: Moe, x: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Group-limited top-k routing, in float32.

    s = sigmoid(x W_g); selection ranks s + e_bias: groups by the sum of their top-2, keep `topk_group` groups,
    then the top `num_experts_per_tok` experts among them. Weights use s itself, normalised over the selected
    experts and scaled by `routed_scaling_factor`.

    Args: x: [T, D]. Returns: weights [T, X] float32, expert ids [T, X] int32.
    """
    with jax.named_scope("router"):
        t, e, g = x.shape[0], cfg.n_routed_experts, cfg.n_group
        logits = jnp.einsum("TD,DE->TE", x.astype(F32), p.w_router.astype(F32), preferred_element_type=F32)
        scores = jax.nn.sigmoid(logits)  # [T, E]
        choice = scores + p.e_bias.astype(F32)  # [T, E] selection only
        group_scores = jax.lax.top_k(choice.reshape(t, g, e // g), 2)[0].sum(-1)  # [T, G]
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)  # [T, topk_group]
        keep_group = jnp.zeros((t, g), bool).at[jnp.arange(t)[:, None], top_groups].set(True)
        keep = jnp.repeat(keep_group, e // g, axis=1)  # [T, E]
        _, idx = jax.lax.top_k(jnp.where(keep, choice, -jnp.inf), cfg.num_experts_per_tok)  # [T, X]
        w = jnp.take_along_axis(scores, idx, axis=1)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        return w * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def experts_dense_reference(p: Moe, x: jax.Array, w: jax.Array, idx: jax.Array) -> jax.Array:
    """All experts for all tokens, combined with the routing weights (zeros elsewhere). x: [T, D] -> [T, D] f32."""
    t, e = x.shape[0], p.we1.shape[0]
    combine = jnp.zeros((t, e), F32).at[jnp.arange(t)[:, None], idx].add(w)  # [T, E]
    gate = jnp.einsum("TD,EDM->TEM", x, p.we1, preferred_element_type=F32)
    up = jnp.einsum("TD,EDM->TEM", x, p.we3, preferred_element_type=F32)
    y = jnp.einsum("TEM,EMD->TED", (jax.nn.silu(gate) * up).astype(x.dtype), p.we2, preferred_element_type=F32)
    return jnp.einsum("TED,TE->TD", y, combine)


def experts_gather(p: Moe, x: jax.Array, w: jax.Array, idx: jax.Array) -> jax.Array:
    """Selected experts only, by gathering their weights: reads T*X experts. x: [T, D] -> [T, D] f32."""
    with jax.named_scope("experts_gather"):
        w1, w3, w2 = (jnp.take(a, idx, axis=0) for a in (p.we1, p.we3, p.we2))  # [T, X, D, M], [T, X, M, D]
        gate = jnp.einsum("TD,TXDM->TXM", x, w1, preferred_element_type=F32)
        up = jnp.einsum("TD,TXDM->TXM", x, w3, preferred_element_type=F32)
        h = (jax.nn.silu(gate) * up).astype(x.dtype)
        y = jnp.einsum("TXM,TXMD->TXD", h, w2, preferred_element_type=F32)
        return jnp.einsum("TXD,TX->TD", y, w)


def grouped_swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, group_sizes: jax.Array,
                   tile_m: int) -> jax.Array:
    """SwiGLU expert MLPs over rows sorted by expert: rows [start_e, end_e) use expert e.

    Work items are (row tile, expert) pairs that overlap, computed up front (the tile-to-expert map a grouped
    matmul kernel prefetches); items for empty groups do not exist, items past the last are skipped.
    Args: x: [Mr, D] sorted rows; w1, w3: [E, D, M]; w2: [E, M, D]; group_sizes: [E] summing to Mr.
    Returns [Mr, D] float32.
    """
    m, d = x.shape
    n_exp = w1.shape[0]
    n_tiles = -(-m // tile_m)
    x_pad = jnp.pad(x, ((0, n_tiles * tile_m - m), (0, 0)))
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // tile_m
    n_items = jnp.where(group_sizes > 0, (ends - 1) // tile_m - first + 1, 0)
    item_end = jnp.cumsum(n_items)
    item_start = item_end - n_items
    total = item_end[-1]

    def run(j, out):
        e = jnp.minimum(jnp.searchsorted(item_end, j, side="right"), n_exp - 1)
        r0 = (first[e] + j - item_start[e]) * tile_m
        rows = jax.lax.dynamic_slice_in_dim(x_pad, r0, tile_m)  # [tile, D]
        rid = r0 + jnp.arange(tile_m)
        valid = (rid >= starts[e]) & (rid < ends[e])
        gate = jnp.dot(rows, w1[e], preferred_element_type=F32)
        up = jnp.dot(rows, w3[e], preferred_element_type=F32)
        y = jnp.dot((jax.nn.silu(gate) * up).astype(x.dtype), w2[e], preferred_element_type=F32)
        cur = jax.lax.dynamic_slice_in_dim(out, r0, tile_m)
        return jax.lax.dynamic_update_slice_in_dim(out, cur + jnp.where(valid[:, None], y, 0.0), r0, 0)

    def body(j, out):
        return jax.lax.cond(j < total, run, lambda j, o: o, j, out)

    out = jax.lax.fori_loop(0, n_tiles + n_exp - 1, body, jnp.zeros((n_tiles * tile_m, d), F32))
    return out[:m]


def _tile_rows(rows: int, n_exp: int) -> int:
    """Row tile: about the mean group size, a power of two in [8, 128]."""
    mean = max(rows // n_exp, 1)
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def experts_grouped(p: Moe, x: jax.Array, w: jax.Array, idx: jax.Array) -> jax.Array:
    """Sort (token, expert) pairs by expert, grouped SwiGLU, weighted scatter-add back. x: [T, D] -> [T, D] f32."""
    with jax.named_scope("experts_grouped"):
        t, k = idx.shape
        n_exp = p.we1.shape[0]
        flat = idx.reshape(-1)  # [T*X]
        order = jnp.argsort(flat, stable=True)
        token = order // k
        sizes = jnp.bincount(flat, length=n_exp)
        ys = grouped_swiglu(x[token], p.we1, p.we3, p.we2, sizes, _tile_rows(t * k, n_exp))  # [T*X, D]
        ys = ys * w.reshape(-1)[order][:, None]
        return jnp.zeros((t, x.shape[1]), F32).at[token].add(ys)


def moe(p: Moe, x: jax.Array, cfg: Config, *, impl: str = "auto") -> jax.Array:
    """Routed experts + shared expert. x: [B, T, D] -> [B, T, D].

    impl: "gather" (reads the T*X selected experts), "grouped" (sort + grouped matmul), "dense" (reference), or
    "auto": gather when the token-expert pairs are fewer than half the experts (decode), else grouped.
    """
    b, t, d = x.shape
    x_td = x.reshape(b * t, d)
    w, idx = route(p, x_td, cfg)
    if impl == "auto":
        impl = "gather" if b * t * cfg.num_experts_per_tok * 2 <= cfg.n_routed_experts else "grouped"
    fn = {"gather": experts_gather, "grouped": experts_grouped, "dense": experts_dense_reference}[impl]
    routed = fn(p, x_td, w, idx)
    shared = swiglu(p.shared, x_td).astype(F32)
    return (routed + shared).astype(x.dtype).reshape(b, t, d)
