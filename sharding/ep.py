"""Expert parallelism as a wrapper around any local expert implementation, with jax.shard_map. The routed experts
split over the mesh axes the rules give `experts`, their width over those of `expert_ffn`, the tokens over those of
`batch` (default rules: expert, tensor, data).

    local(x [T, D], w [T, X], idx [T, X], we1, we3, we2, layer) -> [T, D] float32

runs on each device over its own expert stacks, with expert ids made local (another device's pairs fall outside
[0, E_local) and contribute nothing). Two dispatches:

psum (decode-friendly): tokens stay on their batch shard, replicated across the expert and width axes; each
device computes every pair whose expert it owns (width M/tp), and one psum combines the partial outputs:
    x[BT_data, D] ; W1,W3[E_expert, D, M_tensor] ; W2[E_expert, M_tensor, D]
    -> y[BT_data, D]{U_expert, U_tensor} -> psum(expert, tensor) -> y[BT_data, D]
all_to_all (prefill-friendly): tokens split over batch x expert; every pair goes to the device that owns its
expert in one all_to_all, the local implementation runs there on those rows, the results come back in a second
all_to_all; the width axes are reduced with a psum. Dropless: the send buffer holds every local pair for any one
destination (capacity T_local * X):
    x[BT_(data,expert), D] -> send[ep, C, D] -all_to_all(expert)-> recv[ep, C, D] -> local experts (width M/tp)
    -> all_to_all back -> y[BT_(data,expert), D]{U_tensor} -> psum(tensor)
"auto" takes all_to_all when the step's tokens split evenly over batch x expert with at least a2a_min_tokens
each, psum otherwise (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import flat_axes, mesh_size

F32 = jnp.float32


def resolve_dispatch(dispatch: str, tokens: int, mesh, rules, a2a_min_tokens: int = 1) -> str:
    """"psum" or "all_to_all" for a step of `tokens` tokens ("auto": see the module docstring)."""
    ranks = mesh_size(mesh, flat_axes(rules.axes("batch")) + flat_axes(rules.axes("experts")))
    even = tokens % ranks == 0
    if dispatch == "auto":
        return "all_to_all" if even and tokens // ranks >= a2a_min_tokens else "psum"
    if dispatch == "all_to_all" and not even:
        raise ValueError(f"all_to_all dispatch needs the {tokens} tokens of a step to split evenly over the "
                         f"batch x expert ranks ({ranks})")
    return dispatch


def expert_parallel(local, x, w, idx, stacks, layer, specs, plan):
    """local's result for every token, with the experts split over the plan's mesh. x: [T, D]; w, idx: [T, X]
    (routing, computed replicated); stacks: (we1, we3, we2) whole, [L, E, ...] with `layer` an index, or one
    layer's [E, ...] with layer None; specs: their PartitionSpecs (codes and scales of quantized stacks included).
    Returns [T, D] float32, equal to the single-device result."""
    mesh, rules = plan.mesh, plan.rules
    experts, width, batch = (flat_axes(rules.axes(a)) for a in ("experts", "expert_ffn", "batch"))
    mode = resolve_dispatch(plan.dispatch, x.shape[0], mesh, rules, plan.a2a_min_tokens)
    stacked = layer is not None
    n_local = stacks[0].shape[1 if stacked else 0] // mesh_size(mesh, experts)
    layer = jnp.int32(0) if layer is None else layer
    reduce = experts + width if mode == "psum" else width
    rows = P(batch or None, None) if mode == "psum" else P(batch + experts or None, None)

    def on_device(x, w, idx, we1, we3, we2, layer):
        e0 = jax.lax.axis_index(experts) * n_local if experts else 0
        if mode == "psum":
            out = local(x, w, idx - e0, we1, we3, we2, layer)
        else:
            out = _all_to_all(local, x, w, idx, (we1, we3, we2, layer), n_local, experts)
        with jax.named_scope("ep_psum"):
            return jax.lax.psum(out, reduce) if reduce else out

    fn = jax.shard_map(on_device, mesh=mesh, in_specs=(rows, rows, rows, *specs, P()), out_specs=rows,
                       check_vma=False)
    return fn(x, w, idx, *stacks, layer)


def _all_to_all(local, x, w, idx, weights, n_local: int, experts: tuple[str, ...]):
    """One device's share of the all_to_all dispatch (see the module docstring)."""
    t, k = idx.shape
    d = x.shape[1]
    ep = jax.lax.psum(1, experts)
    cap = t * k
    flat_e = idx.reshape(-1)  # [t*k] global expert ids
    dest = flat_e // n_local
    order = jnp.argsort(dest, stable=True)  # pairs grouped by destination device
    dest_sorted = dest[order]
    counts = jnp.bincount(dest, length=ep)
    slot = jnp.arange(t * k) - (jnp.cumsum(counts) - counts)[dest_sorted]  # position within its destination
    token = order // k
    send_x = jnp.zeros((ep, cap, d), x.dtype).at[dest_sorted, slot].set(x[token])
    send_e = jnp.full((ep, cap), n_local, jnp.int32).at[dest_sorted, slot].set(flat_e[order] % n_local)
    with jax.named_scope("ep_dispatch"):
        recv_x = jax.lax.all_to_all(send_x, experts, 0, 0, tiled=False)  # [ep (source), cap, D]
        recv_e = jax.lax.all_to_all(send_e, experts, 0, 0, tiled=False)
    rows_e = recv_e.reshape(-1, 1)  # one pair per received row; empty slots carry n_local (nobody's)
    ys = local(recv_x.reshape(-1, d), jnp.ones(rows_e.shape, F32), rows_e, *weights).reshape(ep, cap, d)
    with jax.named_scope("ep_combine"):
        back = jax.lax.all_to_all(ys, experts, 0, 0, tiled=False)  # [ep (dest), cap, D] back at the source
    pairs = back[dest_sorted, slot] * w.reshape(-1)[order][:, None]
    return jnp.zeros((t, d), F32).at[token].add(pairs)
