"""Expert parallelism with jax.shard_map: tokens stay where they are on the data axis and are replicated across
the expert and tensor axes; each device runs the grouped matmul over its own experts (E/ep of them, width
M/tp) for the tokens routed to them, and one psum over (expert, tensor) combines the partial outputs.

Layout, scaling-book style:  x[BT_data, D] ; W1,W3[E_expert, D, M_tensor] ; W2[E_expert, M_tensor, D]
    -> y[BT_data, D]{U_expert, U_tensor} -> psum(expert, tensor) -> y[BT_data, D]
No token is dropped: a device computes every (token, expert) pair whose expert it owns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.layers import F32
from model.moe import _tile_rows, grouped_swiglu


def experts_ep(we1, we3, we2, x, w, idx, layer, mesh):
    """x: [T, D]; w, idx: [T, X] (routing, computed replicated); we*: [E, ...] or [L, E, ...] with layer index.

    Returns [T, D] float32, equal to the single-device grouped path.
    """
    stacked = layer is not None
    lead = (None,) if stacked else ()
    spec13, spec2 = P(*lead, "expert", None, "tensor"), P(*lead, "expert", "tensor", None)
    rows = P("data", None)

    def local(x, w, idx, we1, we3, we2, layer):
        t, k = idx.shape
        e_local = we1.shape[1 if stacked else 0]
        e0 = jax.lax.axis_index("expert") * e_local
        lid = idx - e0
        mine = (lid >= 0) & (lid < e_local)
        flat = jnp.where(mine, lid, e_local).reshape(-1)  # others go to a trailing group that is never computed
        order = jnp.argsort(flat, stable=True)
        token = order // k
        sizes = jnp.bincount(flat, length=e_local + 1)[:e_local]
        if stacked:
            views = [a.reshape(-1, *a.shape[2:]) for a in (we1, we3, we2)]
            offset = layer * e_local
        else:
            views, offset = [we1, we3, we2], 0
        ys = grouped_swiglu(x[token], *views, sizes, _tile_rows(t * k, e_local), expert_offset=offset)
        ys = ys * jnp.where(mine, w, 0.0).reshape(-1)[order][:, None]
        out = jnp.zeros((t, x.shape[1]), F32).at[token].add(ys)
        with jax.named_scope("ep_psum"):
            return jax.lax.psum(out, ("expert", "tensor"))

    layer = jnp.int32(0) if layer is None else layer
    fn = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, spec13, spec13, spec2, P()), out_specs=rows,
                       check_vma=False)
    return fn(x, w, idx, we1, we3, we2, layer)
