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
from quant.qarray import map_leading, spec_for


def _local_experts(ws, layer, e_local):
    """This device's expert shards as [L*E_local, ...] views (stacked) plus the layer's expert offset."""
    if layer is None:
        return list(ws), 0
    return [map_leading(lambda v: v.reshape(-1, *v.shape[2:]), a) for a in ws], layer * e_local


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
        views, offset = _local_experts((we1, we3, we2), layer if stacked else None, e_local)
        ys = grouped_swiglu(x[token], *views, sizes, _tile_rows(t * k, e_local, t), expert_offset=offset)
        ys = ys * jnp.where(mine, w, 0.0).reshape(-1)[order][:, None]
        out = jnp.zeros((t, x.shape[1]), F32).at[token].add(ys)
        with jax.named_scope("ep_psum"):
            return jax.lax.psum(out, ("expert", "tensor"))

    layer = jnp.int32(0) if layer is None else layer
    fn = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, spec_for(spec13, we1), spec_for(spec13, we3),
                                                       spec_for(spec2, we2), P()), out_specs=rows,
                       check_vma=False)
    return fn(x, w, idx, we1, we3, we2, layer)


def experts_ep_all_to_all(we1, we3, we2, x, w, idx, layer, mesh):
    """Dispatch/combine expert parallelism: each device keeps its own shard of the tokens (rows split over data x
    expert), sends every (token, expert) pair to the device that owns the expert with one all_to_all, runs the
    grouped matmul there, and sends the results back with a second all_to_all; the tensor axis (expert width) is
    reduced with a psum. Dropless: the send buffer holds every local pair for any one destination (capacity
    T_local * X), so no pair can overflow.

    Layout: x[BT_(data,expert), D] -> send[ep, C, D] -all_to_all(expert)-> recv[ep, C, D] -> grouped matmul over
    E/ep local experts (width M/tp) -> all_to_all back -> y[BT_(data,expert), D]{U_tensor} -> psum(tensor).
    """
    stacked = layer is not None
    lead = (None,) if stacked else ()
    spec13, spec2 = P(*lead, "expert", None, "tensor"), P(*lead, "expert", "tensor", None)
    rows = P(("data", "expert"), None)
    ep = mesh.shape["expert"]

    def local(x, w, idx, we1, we3, we2, layer):
        t, k = idx.shape
        d = x.shape[1]
        e_local = we1.shape[1 if stacked else 0]
        cap = t * k
        flat_e = idx.reshape(-1)  # [t*k] global expert ids
        dest = flat_e // e_local
        order = jnp.argsort(dest, stable=True)  # pairs grouped by destination device
        dest_sorted = dest[order]
        counts = jnp.bincount(dest, length=ep)
        slot = jnp.arange(t * k) - (jnp.cumsum(counts) - counts)[dest_sorted]  # position within its destination
        token = order // k
        send_x = jnp.zeros((ep, cap, d), x.dtype).at[dest_sorted, slot].set(x[token])
        send_e = jnp.full((ep, cap), e_local, jnp.int32).at[dest_sorted, slot].set(flat_e[order] % e_local)
        with jax.named_scope("ep_dispatch"):
            recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=False)  # [ep(source), cap, D]
            recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=False)
        rx, re = recv_x.reshape(ep * cap, d), recv_e.reshape(-1)
        o2 = jnp.argsort(re, stable=True)
        sizes = jnp.bincount(re, length=e_local + 1)[:e_local]  # slot e_local = empty, never computed
        views, offset = _local_experts((we1, we3, we2), layer if stacked else None, e_local)
        ys = grouped_swiglu(rx[o2], *views, sizes, _tile_rows(ep * cap, e_local), expert_offset=offset)
        back = jnp.zeros((ep * cap, d), F32).at[o2].set(ys).reshape(ep, cap, d)
        with jax.named_scope("ep_combine"):
            got = jax.lax.all_to_all(back, "expert", 0, 0, tiled=False)  # [ep(dest), cap, D] back at the source
        ys_pairs = got[dest_sorted, slot] * w.reshape(-1)[order][:, None]
        out = jnp.zeros((t, d), F32).at[token].add(ys_pairs)
        with jax.named_scope("tp_psum"):
            return jax.lax.psum(out, "tensor")

    layer = jnp.int32(0) if layer is None else layer
    fn = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, spec_for(spec13, we1), spec_for(spec13, we3),
                                                       spec_for(spec2, we2), P()), out_specs=rows,
                       check_vma=False)
    return fn(x, w, idx, we1, we3, we2, layer)


def experts_ep_dispatch(we1, we3, we2, x, w, idx, layer, mesh):
    """Pick the expert-parallel form: a plain Mesh uses psum; an EPMesh says which (see sharding.mesh.EPMesh)."""
    from sharding.mesh import EPMesh

    if not isinstance(mesh, EPMesh):
        return experts_ep(we1, we3, we2, x, w, idx, layer, mesh)
    m, mode = mesh.mesh, mesh.dispatch
    ranks = m.shape["data"] * m.shape["expert"]
    rows_per_rank = x.shape[0] // ranks if x.shape[0] % ranks == 0 else 0  # 0: tokens do not split evenly
    if mode == "auto":
        mode = "all_to_all" if rows_per_rank >= mesh.a2a_min_tokens else "psum"
    if mode == "all_to_all":
        if rows_per_rank == 0:
            raise ValueError(f"all_to_all dispatch needs the {x.shape[0]} tokens of a step to split evenly over "
                             f"data x expert = {m.shape['data'] * m.shape['expert']} ranks")
        return experts_ep_all_to_all(we1, we3, we2, x, w, idx, layer, m)
    return experts_ep(we1, we3, we2, x, w, idx, layer, m)
