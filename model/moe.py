"""DeepSeekMoE: a sigmoid router with a selection-only bias and group-limited top-k, the routed experts through one
local implementation the plan names (wrapped by expert parallelism on a mesh, sharding/ep.py), plus the shared
expert.

Every routed-expert implementation has one signature, f(x [T, D], w [T, X], idx [T, X], view) -> [T, D] float32:
idx holds expert ids local to `view` (this device's experts, this layer's slice of the stacks), and a pair whose id
lies outside [0, view.n) belongs to another device and contributes nothing.
- grouped: the pairs sorted by expert (`dispatch`), a grouped SwiGLU over row tiles aligned to each expert, the
  weighted scatter-add back (`combine`); reads each used expert once per row tile; differentiable (training).
- gather: each pair's expert matrices gathered, then batched products; reads T*X experts.
- dense: every expert for every token, masked by the routing weights: the reference.
- pallas: the grouped-matmul kernel (pallas_kernels/) on the same dispatch and combine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from model.config import Config
from model.layers import F32, swiglu
from model.params import Moe
from model.routing import Routed
from pallas_kernels.ops import grouped_swiglu as pallas_grouped_swiglu
from quant.qarray import activation, map_leading, quantizes_activation, weight
from sharding.ep import expert_parallel


def route(p: Moe, x: jax.Array, cfg: Config):
    """DeepSeek-V3's noaux_tc routing: sigmoid scores; the correction bias is added for *selection only*; groups
    ranked by the sum of their top-2 biased scores, the best `topk_group` groups kept, top-k experts chosen among
    them; weights are the unbiased scores of the chosen experts, normalised to sum 1 (norm_topk_prob) and scaled
    by `routed_scaling_factor`.

    Args: x: [T, D]. Returns: weights [T, X] float32, expert ids [T, X] int32, the scores [T, E].
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
        return w * cfg.routed_scaling_factor, idx.astype(jnp.int32), scores


# ---- the expert view and the dispatch every implementation shares ---------------------------------------------

@struct.dataclass
class ExpertView:
    """The routed experts one layer reads: the stacks as [L * E, ...] (a free reshape of the whole [L, E, ...]
    stacks) and this layer's offset into them, or one layer's [E, ...] stacks with offset 0. Slicing one layer's
    [E, ...] out of the stacks inside the layer scan would copy every expert of the layer when a step reads a few.
    n: experts per layer (on this device)."""

    we1: jax.Array
    we3: jax.Array
    we2: jax.Array
    offset: jax.Array | int
    n: int = struct.field(pytree_node=False)

    def one(self, e):
        """Expert e's (w1, w3, w2) (plain or quantized), read in place by a dynamic index."""
        return tuple(map_leading(lambda v: jax.lax.dynamic_index_in_dim(v, self.offset + e, keepdims=False), w)
                     for w in (self.we1, self.we3, self.we2))


def expert_view(we1, we3, we2, layer) -> ExpertView:
    """layer: the index into [L, E, ...] stacks, or None for one layer's [E, ...] stacks."""
    if layer is None:
        return ExpertView(we1, we3, we2, 0, we1.shape[0])
    n = we1.shape[1]
    flat = [map_leading(lambda a: a.reshape(-1, *a.shape[2:]), w) for w in (we1, we3, we2)]
    return ExpertView(*flat, layer * n, n)


@struct.dataclass
class Dispatch:
    """The (token, expert) pairs sorted by expert: P = T * X pairs, the other devices' pairs last."""

    order: jax.Array  # [P] pair index (token * X + slot) of each sorted pair
    token: jax.Array  # [P] its token
    expert: jax.Array  # [P] its local expert, n for another device's pair
    weight: jax.Array  # [P] its routing weight, 0 for another device's pair
    sizes: jax.Array  # [n] pairs per local expert


def dispatch(w: jax.Array, idx: jax.Array, n: int) -> Dispatch:
    """Sort the pairs of w, idx [T, X] by local expert (ids outside [0, n) go last, as expert n)."""
    flat = idx.reshape(-1)
    mine = (flat >= 0) & (flat < n)
    flat = jnp.where(mine, flat, n)
    order = jnp.argsort(flat, stable=True)
    return Dispatch(order=order, token=order // idx.shape[1], expert=flat[order],
                    weight=jnp.where(mine, w.reshape(-1), 0.0)[order],
                    sizes=jnp.bincount(flat, length=n + 1)[:n].astype(jnp.int32))


def combine(ys: jax.Array, d: Dispatch, t: int) -> jax.Array:
    """Sorted pair outputs [P, D] -> their routing-weighted sum per token [T, D] float32."""
    return jnp.zeros((t, ys.shape[-1]), F32).at[d.token].add(ys.astype(F32) * d.weight[:, None])


# ---- implementations --------------------------------------------------------------------------------------------

def grouped_swiglu(x: jax.Array, view: ExpertView, group_sizes: jax.Array, tile_m: int, *,
                   differentiable: bool = False) -> jax.Array:
    """SwiGLU expert MLPs over rows sorted by expert: rows [start_e, end_e) use expert e of the view.

    Work items are row tiles aligned to each expert's first row: expert e with s_e rows gets ceil(s_e / tile_m)
    items, so at most one partial tile per non-empty expert and none for empty ones. The item-to-expert map is
    computed up front (what a grouped-matmul kernel prefetches), in the order of the experts, which each tile's
    write relies on (below). Inference runs exactly the items there are (a while loop); `differentiable=True` runs
    a fixed-length loop that skips the rest, which reverse-mode differentiation needs. Rows past sum(group_sizes)
    come back as zeros.
    Args: x: [Mr, D] sorted rows; group_sizes: [n]. Returns [Mr, D] float32.
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
    total_rows = ends[-1]
    j_all = jnp.arange(max_items, dtype=item_end.dtype)
    # [max_items] expert of each item: one comparison of every item with every expert's end (small: items x
    # experts), where the default binary search is a loop of small steps
    item_e = jnp.minimum(jnp.searchsorted(item_end, j_all, side="right", method="compare_all"), n_exp - 1)
    item_r0 = starts[item_e] + (j_all - item_start[item_e]) * tile_m  # and its first row

    def run(j, out):
        e, r0 = item_e[j], item_r0[j]
        rows = jax.lax.dynamic_slice_in_dim(x_pad, r0, tile_m)  # [tile, D]
        a, b, c = view.one(e)  # one expert's weights (dequantized below when quantized)
        rows_a = activation(rows, a)
        gate = jnp.dot(rows_a, weight(a, x.dtype), preferred_element_type=F32)
        up = jnp.dot(rows_a, weight(b, x.dtype), preferred_element_type=F32)
        h = activation((jax.nn.silu(gate) * up).astype(x.dtype), c)
        y = jnp.dot(h, weight(c, x.dtype), preferred_element_type=F32)
        # written, not added: a tile running past its expert's rows writes into the next experts' rows, which
        # their own items, later in the loop, overwrite; past the last expert, the rows are zeroed below
        return jax.lax.dynamic_update_slice_in_dim(out, y, r0, 0)

    out = jnp.zeros((m + tile_m, d), F32)
    if differentiable:
        out = jax.lax.fori_loop(0, max_items,
                                lambda j, o: jax.lax.cond(j < total, run, lambda j, o: o, j, o), out)
    else:
        out = jax.lax.while_loop(lambda s: s[0] < total, lambda s: (s[0] + 1, run(*s)), (jnp.int32(0), out))[1]
    return jnp.where((jnp.arange(m) < total_rows)[:, None], out[:m], 0.0)


def _tile_rows(rows: int, n_exp: int, tokens: int) -> int:
    """Row tile: 1 for a single token, or when there are at most half as many rows as experts (a verify step of
    two tokens): each expert gets about one row, and a one-row dot is a matrix-vector product, which XLA:CPU
    streams faster than a padded 8-row one. Else about the mean group size, a power of two in [8, 128]."""
    if tokens == 1 or 2 * rows <= n_exp:
        return 1
    mean = max(rows // n_exp, 1)
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def experts_grouped(x, w, idx, view: ExpertView, *, differentiable: bool = False) -> jax.Array:
    """Sort the pairs by expert, grouped SwiGLU, weighted scatter-add back. x: [T, D] -> [T, D] float32."""
    with jax.named_scope("experts_grouped"):
        d = dispatch(w, idx, view.n)
        ys = grouped_swiglu(x[d.token], view, d.sizes, _tile_rows(idx.size, view.n, x.shape[0]),
                            differentiable=differentiable)
        return combine(ys, d, x.shape[0])


def experts_pallas(x, w, idx, view: ExpertView) -> jax.Array:
    """The grouped-matmul kernel (fused gate/up SwiGLU, then the down projection) on the same dispatch."""
    with jax.named_scope("experts_pallas"):
        d = dispatch(w, idx, view.n)
        ys = pallas_grouped_swiglu(x[d.token], view.we1, view.we3, view.we2, d.sizes, view.offset,
                                   jnp.minimum(d.expert, view.n - 1))
        return combine(ys, d, x.shape[0])


def experts_gather(x, w, idx, view: ExpertView) -> jax.Array:
    """Each pair's experts gathered: reads T*X expert matrices. x: [T, D] -> [T, D] float32."""
    with jax.named_scope("experts_gather"):
        mine = (idx >= 0) & (idx < view.n)
        ids = jnp.where(mine, idx, 0) + view.offset
        w1, w3, w2 = (map_leading(lambda v: jnp.take(v, ids, axis=0), a)
                      for a in (view.we1, view.we3, view.we2))  # [T, X, D, M], [T, X, M, D]
        if quantizes_activation(w1):  # each selected expert quantizes its input with its own scale
            xs, spec = activation(jnp.broadcast_to(x[:, None], (*idx.shape, x.shape[1])), w1), "TXD,TXDM->TXM"
        else:
            xs, spec = x, "TD,TXDM->TXM"
        gate = jnp.einsum(spec, xs, weight(w1, x.dtype), preferred_element_type=F32)
        up = jnp.einsum(spec, xs, weight(w3, x.dtype), preferred_element_type=F32)
        h = activation((jax.nn.silu(gate) * up).astype(x.dtype), w2)
        y = jnp.einsum("TXM,TXMD->TXD", h, weight(w2, x.dtype), preferred_element_type=F32)
        return jnp.einsum("TXD,TX->TD", y, jnp.where(mine, w, 0.0))


def experts_dense(x, w, idx, view: ExpertView) -> jax.Array:
    """The reference: every expert of the view for every token, combined with the routing weights (zeros for
    pairs routed elsewhere). x: [T, D] -> [T, D] float32."""
    n, t = view.n, x.shape[0]
    we1, we3, we2 = (map_leading(lambda v: jax.lax.dynamic_slice_in_dim(v, view.offset, n), a)
                     for a in (view.we1, view.we3, view.we2))
    mine = (idx >= 0) & (idx < n)
    mix = jnp.zeros((t, n + 1), F32).at[jnp.arange(t)[:, None], jnp.where(mine, idx, n)].add(w)[:, :n]  # [T, E]
    if quantizes_activation(we1):  # each expert quantizes its input with its own scale
        xs, spec = activation(jnp.broadcast_to(x, (n, *x.shape)), we1), "ETD,EDM->TEM"
    else:
        xs, spec = x, "TD,EDM->TEM"
    gate = jnp.einsum(spec, xs, weight(we1, x.dtype), preferred_element_type=F32)
    up = jnp.einsum(spec, xs, weight(we3, x.dtype), preferred_element_type=F32)
    h = (jax.nn.silu(gate) * up).astype(x.dtype)  # [T, E, M]
    if quantizes_activation(we2):
        h = jnp.swapaxes(activation(jnp.swapaxes(h, 0, 1), we2), 0, 1)
    y = jnp.einsum("TEM,EMD->TED", h, weight(we2, x.dtype), preferred_element_type=F32)
    return jnp.einsum("TED,TE->TD", y, mix)


IMPLEMENTATIONS = {"grouped": experts_grouped, "gather": experts_gather, "dense": experts_dense,
                   "pallas": experts_pallas}


def routed_experts(p: Moe, x, w, idx, plan, phase: str) -> jax.Array:
    """The plan's implementation over this layer's experts, expert-parallel when the plan's mesh splits them."""
    local = IMPLEMENTATIONS[plan.experts]
    if plan.experts == "grouped":
        local = functools.partial(local, differentiable=phase == "train")
    if not plan.expert_parallel:
        return local(x, w, idx, expert_view(p.we1, p.we3, p.we2, p.layer))

    def on_device(x, w, idx, we1, we3, we2, layer):  # local stacks [(L,) E_local, ...]
        return local(x, w, idx, expert_view(we1, we3, we2, None if p.layer is None else layer))
    specs = plan.expert_specs(p, stacked=p.layer is not None)
    return expert_parallel(on_device, x, w, idx, (p.we1, p.we3, p.we2), p.layer, specs, plan)


# ---- the layer ------------------------------------------------------------------------------------------------

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


def moe(p: Moe, x: jax.Array, cfg: Config, plan, phase: str, routing: bool = False):
    """Routed experts + shared expert. x: [B, T, D] -> ([B, T, D], stats): stats = (load [E], balance term) in
    the train phase (the balance loss and the router-bias rule need them); with routing=True, the router's
    choice as a `Routed` (experts and weights [B, T, X], model/routing.py); else None."""
    b, t, d = x.shape
    x_td = x.reshape(b * t, d)
    w, idx, scores = route(p, x_td, cfg)
    routed = routed_experts(p, x_td, w, idx, plan, phase)
    shared = swiglu(p.shared, x_td).astype(F32)
    if phase == "train":
        stats = balance_stats(scores, idx, b, cfg)
    else:
        stats = Routed(experts=idx.reshape(b, t, -1), weights=w.reshape(b, t, -1)) if routing else None
    return (routed + shared).astype(x.dtype).reshape(b, t, d), stats
