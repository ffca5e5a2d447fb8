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
from model.layers import F32, swiglu, swiglu_out_major
from model.params import Moe
from quant.qarray import activation, map_leading, quantizes_activation, weight


def route(p: Moe, x: jax.Array, cfg: Config, *, return_scores: bool = False):
    """Group-limited top-k routing, in float32.

    s = sigmoid(x W_g); selection ranks s + e_bias: groups by the sum of their top-2, keep `topk_group` groups,
    then the top `num_experts_per_tok` experts among them. Weights use s itself, normalised over the selected
    experts and scaled by `routed_scaling_factor`.

    Args: x: [T, D]. Returns: weights [T, X] float32, expert ids [T, X] int32 (and the scores [T, E]).
    """
    with jax.named_scope("router"):
        t, e, g = x.shape[0], cfg.n_routed_experts, cfg.n_group
        logits = jnp.einsum("TD,DE->TE", x.astype(F32), p.w_router.astype(F32), preferred_element_type=F32)
        scores = jax.nn.sigmoid(logits)  # [T, E]
        choice = scores + jax.lax.stop_gradient(p.e_bias).astype(F32)  # [T, E] selection only
        group_scores = jax.lax.top_k(choice.reshape(t, g, e // g), 2)[0].sum(-1)  # [T, G]
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)  # [T, topk_group]
        keep_group = jnp.zeros((t, g), bool).at[jnp.arange(t)[:, None], top_groups].set(True)
        keep = jnp.repeat(keep_group, e // g, axis=1)  # [T, E]
        _, idx = jax.lax.top_k(jnp.where(keep, choice, -jnp.inf), cfg.num_experts_per_tok)  # [T, X]
        w = jnp.take_along_axis(scores, idx, axis=1)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        w = w * cfg.routed_scaling_factor
        return (w, idx.astype(jnp.int32), scores) if return_scores else (w, idx.astype(jnp.int32))


def _expert_view(w: jax.Array, layer) -> tuple[jax.Array, jax.Array | int]:
    """Expert weights as [E', ...] plus the id offset of this layer's experts.

    Inside the scan over layers the expert stacks stay whole ([L, E, D, M], viewed as [L*E, D, M] for free) and
    are indexed by (layer, expert): slicing out one layer's [E, D, M] first would make XLA copy every expert of
    the layer when only a few are read.
    """
    if layer is None:
        return w, 0
    return map_leading(lambda a: a.reshape(-1, *a.shape[2:]), w), layer * w.shape[1]


def experts_dense_reference(p: Moe, x: jax.Array, w: jax.Array, idx: jax.Array, layer=None) -> jax.Array:
    """All experts for all tokens, combined with the routing weights (zeros elsewhere). x: [T, D] -> [T, D] f32."""
    we1, we3, we2 = (a if layer is None else map_leading(lambda v: v[layer], a) for a in (p.we1, p.we3, p.we2))
    t, e = x.shape[0], we1.shape[0]
    combine = jnp.zeros((t, e), F32).at[jnp.arange(t)[:, None], idx].add(w)  # [T, E]
    if quantizes_activation(we1):  # each expert quantizes its input with its own scale
        xs, spec = activation(jnp.broadcast_to(x, (e, *x.shape)), we1), "ETD,EDM->TEM"
    else:
        xs, spec = x, "TD,EDM->TEM"
    gate = jnp.einsum(spec, xs, weight(we1, x.dtype), preferred_element_type=F32)
    up = jnp.einsum(spec, xs, weight(we3, x.dtype), preferred_element_type=F32)
    h = (jax.nn.silu(gate) * up).astype(x.dtype)  # [T, E, M]
    if quantizes_activation(we2):
        h = jnp.swapaxes(activation(jnp.swapaxes(h, 0, 1), we2), 0, 1)
    y = jnp.einsum("TEM,EMD->TED", h, weight(we2, x.dtype), preferred_element_type=F32)
    return jnp.einsum("TED,TE->TD", y, combine)


def experts_gather(p: Moe, x: jax.Array, w: jax.Array, idx: jax.Array, layer=None) -> jax.Array:
    """Selected experts only, by gathering their weights: reads T*X experts. x: [T, D] -> [T, D] f32."""
    with jax.named_scope("experts_gather"):
        (we1, off), (we3, _), (we2, _) = (_expert_view(a, layer) for a in (p.we1, p.we3, p.we2))
        w1, w3, w2 = (map_leading(lambda v: jnp.take(v, idx + off, axis=0), a)
                      for a in (we1, we3, we2))  # [T, X, D, M], [T, X, M, D]: only the selected experts
        if quantizes_activation(w1):  # each selected expert quantizes its input with its own scale
            xs, spec = activation(jnp.broadcast_to(x[:, None], (*idx.shape, x.shape[1])), w1), "TXD,TXDM->TXM"
        else:
            xs, spec = x, "TD,TXDM->TXM"
        gate = jnp.einsum(spec, xs, weight(w1, x.dtype), preferred_element_type=F32)
        up = jnp.einsum(spec, xs, weight(w3, x.dtype), preferred_element_type=F32)
        h = activation((jax.nn.silu(gate) * up).astype(x.dtype), w2)
        y = jnp.einsum("TXM,TXMD->TXD", h, weight(w2, x.dtype), preferred_element_type=F32)
        return jnp.einsum("TXD,TX->TD", y, w)


def experts_single(p: Moe, x: jax.Array, w: jax.Array, idx: jax.Array, layer=None) -> jax.Array:
    """One token: each selected expert's matrices read in place by fused multiply-reduce loops instead of a dot on
    a copied slice. Faster in isolation on XLA:CPU (20 vs 13 GB/s per expert matrix) but slower in the whole
    decode step (49 vs 52 tokens/s on `small`), so `auto` does not pick it. x: [1, D] -> [1, D] f32."""
    with jax.named_scope("experts_single"):
        (we1, off), (we3, _), (we2, _) = (_expert_view(a, layer) for a in (p.we1, p.we3, p.we2))
        x32 = x[0].astype(F32)

        def one(i, acc):
            a, b, c = (map_leading(lambda v: jax.lax.dynamic_index_in_dim(v, off + idx[0, i], keepdims=False), m)
                       for m in (we1, we3, we2))
            xa = activation(x32.astype(x.dtype)[None], a)[0].astype(F32)
            gate = jnp.sum(xa[:, None] * weight(a, F32), axis=0)  # [M]
            up = jnp.sum(xa[:, None] * weight(b, F32), axis=0)
            h = (jax.nn.silu(gate) * up).astype(x.dtype)
            h = activation(h[None], c)[0].astype(F32)
            return acc + w[0, i] * jnp.sum(h[:, None] * weight(c, F32), axis=0)  # [D]
        return jax.lax.fori_loop(0, idx.shape[1], one, jnp.zeros((x.shape[1],), F32))[None]


def experts_switch(p: Moe, x: jax.Array, w: jax.Array, idx: jax.Array, layer=None) -> jax.Array:
    """Experts held as separate buffers (model/layout.py): p.we1/we3/we2 as tuples with one matrix per expert, or,
    for plain weights, p.we1 as a tuple of one OutMajorMlp per expert and we3 = we2 = None. Each (token, expert)
    pair runs in the branch of a `lax.switch` that reads that expert's own buffers, so no slice of a stack is
    copied before the dots. Reads each selected expert once per pair. x: [T, D] -> [T, D] f32.
    Activations quantized without a calibrated input scale get their per-tensor scale from each token alone (the
    grouped path: from each row tile), so with several tokens the two differ by that rounding.
    """
    if layer is not None:
        raise ValueError("experts_switch takes one layer's experts (unstacked), not a layer index into stacks")
    t, k = idx.shape
    out_major = p.we3 is None  # plain experts: p.we1 holds one OutMajorMlp per expert
    experts = p.we1 if out_major else tuple(zip(p.we1, p.we3, p.we2))

    def branch(e):
        def run(experts, row):  # row: [1, D]
            if out_major:
                return swiglu_out_major(experts[e], row)
            a, b, c = experts[e]
            ra = activation(row, a)  # gate and up share one input scale
            gate = jnp.dot(ra, weight(a, row.dtype), preferred_element_type=F32)
            up = jnp.dot(ra, weight(b, row.dtype), preferred_element_type=F32)
            h = activation((jax.nn.silu(gate) * up).astype(row.dtype), c)
            return jnp.dot(h, weight(c, row.dtype), preferred_element_type=F32)
        return run

    with jax.named_scope("experts_switch"):
        branches = [branch(e) for e in range(len(experts))]
        flat_idx, flat_w = idx.reshape(-1), w.reshape(-1)

        def body(j, out):
            tok = j // k
            y = jax.lax.switch(flat_idx[j], branches, experts, jax.lax.dynamic_slice_in_dim(x, tok, 1))
            return out.at[tok].add(flat_w[j] * y[0])
        return jax.lax.fori_loop(0, t * k, body, jnp.zeros(x.shape, F32))


def grouped_swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, group_sizes: jax.Array,
                   tile_m: int, *, expert_offset=0, differentiable: bool = False) -> jax.Array:
    """SwiGLU expert MLPs over rows sorted by expert: rows [start_e, end_e) use expert e.

    Work items are row tiles aligned to each expert's first row: expert e with s_e rows gets ceil(s_e / tile_m)
    items, so at most one partial tile per non-empty expert and none for empty ones. The item-to-expert map is
    computed up front (what a grouped-matmul kernel prefetches). Inference runs exactly the items there are (a
    while loop); `differentiable=True` runs a fixed-length loop that skips the rest, which reverse-mode
    differentiation needs.
    Args: x: [Mr, D] sorted rows; w1, w3: [E', D, M]; w2: [E', M, D], expert e at index expert_offset + e;
      group_sizes: [E] summing to Mr. Returns [Mr, D] float32.
    """
    m, d = x.shape
    n_exp = group_sizes.shape[0]
    max_items = -(-m // tile_m) + n_exp
    x_pad = jnp.pad(x, ((0, tile_m), (0, 0)))  # a tile starting at any row stays in bounds
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    n_items = -(-group_sizes // tile_m)
    item_end = jnp.cumsum(n_items)
    item_start = item_end - n_items
    total = item_end[-1]

    def run(j, out):
        e = jnp.minimum(jnp.searchsorted(item_end, j, side="right"), n_exp - 1)
        r0 = starts[e] + (j - item_start[e]) * tile_m
        rows = jax.lax.dynamic_slice_in_dim(x_pad, r0, tile_m)  # [tile, D]
        valid = r0 + jnp.arange(tile_m) < ends[e]
        a, b, c = (map_leading(lambda v: jax.lax.dynamic_index_in_dim(v, expert_offset + e, keepdims=False), w)
                   for w in (w1, w3, w2))  # one expert's weights (dequantized here when quantized)
        rows_a = activation(rows, a)
        gate = jnp.dot(rows_a, weight(a, x.dtype), preferred_element_type=F32)
        up = jnp.dot(rows_a, weight(b, x.dtype), preferred_element_type=F32)
        h = activation((jax.nn.silu(gate) * up).astype(x.dtype), c)
        y = jnp.dot(h, weight(c, x.dtype), preferred_element_type=F32)
        cur = jax.lax.dynamic_slice_in_dim(out, r0, tile_m)
        return jax.lax.dynamic_update_slice_in_dim(out, cur + jnp.where(valid[:, None], y, 0.0), r0, 0)

    out = jnp.zeros((m + tile_m, d), F32)
    if differentiable:
        out = jax.lax.fori_loop(0, max_items,
                                lambda j, o: jax.lax.cond(j < total, run, lambda j, o: o, j, o), out)
    else:
        out = jax.lax.while_loop(lambda s: s[0] < total, lambda s: (s[0] + 1, run(*s)), (jnp.int32(0), out))[1]
    return out[:m]


def _tile_rows(rows: int, n_exp: int, tokens: int | None = None) -> int:
    """Row tile: about the mean group size, a power of two in [8, 128]; 1 for a single token, whose experts each
    get one row (a one-row dot is a matrix-vector product, which XLA:CPU streams faster than an 8-row one)."""
    if tokens == 1:
        return 1
    mean = max(rows // n_exp, 1)
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def experts_grouped(p: Moe, x: jax.Array, w: jax.Array, idx: jax.Array, layer=None, *,
                    differentiable: bool = False) -> jax.Array:
    """Sort (token, expert) pairs by expert, grouped SwiGLU, weighted scatter-add back. x: [T, D] -> [T, D] f32."""
    with jax.named_scope("experts_grouped"):
        t, k = idx.shape
        (we1, off), (we3, _), (we2, _) = (_expert_view(a, layer) for a in (p.we1, p.we3, p.we2))
        n_exp = p.we1.shape[0 if layer is None else 1]
        flat = idx.reshape(-1)  # [T*X]
        order = jnp.argsort(flat, stable=True)
        token = order // k
        sizes = jnp.bincount(flat, length=n_exp)
        ys = grouped_swiglu(x[token], we1, we3, we2, sizes, _tile_rows(t * k, n_exp, t), expert_offset=off,
                            differentiable=differentiable)  # [T*X, D]
        ys = ys * w.reshape(-1)[order][:, None]
        return jnp.zeros((t, x.shape[1]), F32).at[token].add(ys)


def moe(p: Moe, x: jax.Array, cfg: Config, *, impl: str = "auto", layer=None, mesh=None) -> jax.Array:
    """Routed experts + shared expert. x: [B, T, D] -> [B, T, D].

    impl: "grouped" (sort + grouped matmul, reads each used expert once per row tile), "gather" (gathers the T*X
    selected experts' weights), "dense" (reference), "pallas" (the grouped-matmul kernel of pallas_kernels/),
    "single" (one token: see experts_single; measured slower end to end on CPU than grouped), or "auto" = grouped,
    which measured faster than gather even for a single token on CPU (see docs/benchmarks.md).
    layer: when given, p.we1/we3/we2 are the whole [L, E, ...] stacks and this is the layer's index.
    mesh: with an expert or tensor axis larger than 1, the routed experts run expert-parallel (sharding/ep.py).
    """
    b, t, d = x.shape
    x_td = x.reshape(b * t, d)
    w, idx = route(p, x_td, cfg)
    if isinstance(p.we1, tuple):  # one buffer per expert (model/layout.py)
        if mesh is not None or impl == "pallas":
            raise ValueError("unstacked experts run with the xla backend on one device only")
        routed = experts_switch(p, x_td, w, idx, layer)
    elif mesh is not None and mesh.shape["expert"] * mesh.shape["tensor"] > 1 and impl in ("auto", "grouped"):
        from sharding.ep import experts_ep_dispatch
        routed = experts_ep_dispatch(p.we1, p.we3, p.we2, x_td, w, idx, layer, mesh)
    elif impl == "pallas":
        from pallas_kernels.ops import moe_experts
        routed = moe_experts(p.we1, p.we3, p.we2, x_td, w, idx, layer)
    else:
        impl = "grouped" if impl == "auto" else impl
        fn = {"gather": experts_gather, "grouped": experts_grouped, "dense": experts_dense_reference,
              "single": experts_single}[impl]
        routed = fn(p, x_td, w, idx, layer)
    shared = swiglu(p.shared, x_td).astype(F32)
    return (routed + shared).astype(x.dtype).reshape(b, t, d)


def balance_stats(scores: jax.Array, idx: jax.Array, b: int, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Expert load and DeepSeek-V3's sequence-wise balance loss term (before its alpha).

    scores: [B*T, E] sigmoid scores; idx: [B*T, X]. Per sequence, f_i = E / (X T) * #tokens routed to i and
    P_i = mean_t s_i / sum_j s_j; the term is mean over sequences of sum_i f_i P_i (1 when balanced).
    Returns load [E] (token count per expert, all sequences) and the term (scalar).
    """
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    onehot = jax.nn.one_hot(idx, e, dtype=F32).sum(1).reshape(b, -1, e)  # [B, T, E]
    t = onehot.shape[1]
    f = onehot.sum(1) * e / (k * t)  # [B, E]
    p = (scores / scores.sum(-1, keepdims=True)).reshape(b, t, e).mean(1)  # [B, E]
    return onehot.sum((0, 1)), jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, -1))


def moe_train(p: Moe, x: jax.Array, cfg: Config, *, layer=None, impl: str = "dense"):
    """moe() for training: differentiable experts, plus (load [E], balance term) for load balancing."""
    b, t, d = x.shape
    x_td = x.reshape(b * t, d)
    w, idx, scores = route(p, x_td, cfg, return_scores=True)
    if impl == "grouped":
        routed = experts_grouped(p, x_td, w, idx, layer, differentiable=True)
    else:
        routed = experts_dense_reference(p, x_td, w, idx, layer)
    shared = swiglu(p.shared, x_td).astype(F32)
    return (routed + shared).astype(x.dtype).reshape(b, t, d), balance_stats(scores, idx, b, cfg)
