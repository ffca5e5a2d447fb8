"""One table from logical axis names (declared on every parameter in model/params.py and on the cache) to mesh
axes, and placing trees of arrays on a mesh by their specs. Nothing here knows the model: model/placement.py
turns the declarations into specs.

Decisions (see sharding/README.md): vocabulary rows of the embedding and LM head over expert x tensor (all
devices); attention heads over tensor; routed experts over expert and their width over tensor; dense and shared
FFN width over tensor; the latent cache over batch (data) only, replicated across tensor ranks because every
head reads the whole latent (as DeepSeek's own inference does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from quant.formats import FORMATS
from quant.qarray import is_qarray, spec_for
from sharding.mesh import mesh_sizes

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: Mapping[str, MeshAxes] = {
    "vocab": ("expert", "tensor"),
    "heads": "tensor",
    "experts": "expert",
    "expert_ffn": "tensor",
    "ffn": "tensor",
    "shared_ffn": "tensor",
    "batch": "data",
}


def flat_axes(axes: MeshAxes) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def mesh_size(mesh, axes: MeshAxes) -> int:
    sizes = mesh_sizes(mesh)
    n = 1
    for a in flat_axes(axes):
        n *= sizes[a]
    return n


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axes (a name, a tuple of names, or None: replicated). Hashable, so it travels in a
    static execution plan. `ShardingRules.from_dict({...})` builds one from a mapping."""

    rules: tuple[tuple[str, MeshAxes], ...] = tuple(DEFAULT_RULES.items())

    @classmethod
    def from_dict(cls, rules: Mapping[str, MeshAxes]) -> ShardingRules:
        return cls(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items()))

    def axes(self, logical: str | None) -> MeshAxes:
        return dict(self.rules).get(logical) if logical is not None else None

    def spec(self, logical_axes: tuple[str | None, ...]) -> P:
        out, used = [], set()
        for name in logical_axes:
            mesh_axes = self.axes(name)
            flat = flat_axes(mesh_axes)
            if used & set(flat):
                raise ValueError(f"logical axes {logical_axes} map mesh axes {flat} twice")
            used |= set(flat)
            out.append(mesh_axes)
        return P(*out)

    def check_mesh(self, mesh) -> None:
        """Every mesh axis the rules name exists in the mesh (a misspelt axis would silently replicate)."""
        names = set(mesh_sizes(mesh))
        unknown = {a for _, v in self.rules for a in flat_axes(v)} - names
        if unknown:
            raise ValueError(f"sharding rules name mesh axes {sorted(unknown)} that mesh {mesh_sizes(mesh)} "
                             f"does not have")


def _place(x, sharding: NamedSharding):
    """device_put, or (multi-process) assemble the global array from this host's copy of the full value."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def check_quantized(name: str, w, spec: P, mesh) -> None:
    """A quantized weight splits over the mesh only at whole scale blocks (FP8: whole 128 x 128 tiles)."""
    qs = spec_for(spec, w)
    fmt = FORMATS[w.fmt]
    if fmt.row_block > 1:  # 2-D scale tiles over (flattened output rows, K): a shard holds whole tiles
        rows = int(np.prod(w.codes.shape[w.batch_ndim:-1]))
        for what, n, block, axes in (("output rows", rows, fmt.row_block, qs.scales[w.batch_ndim]),
                                     ("reduction axis", w.k, fmt.block, qs.scales[w.batch_ndim + 1])):
            size = mesh_size(mesh, axes)
            if size > 1 and (n % size or (n // size) % block):
                raise ValueError(f"{name}: {w.fmt} {fmt.row_block}x{fmt.block} tiles cannot be split over mesh axes "
                                 f"{axes} of size {size}: {what} {n} / {size} is not a multiple of {block}")
    for what, arr, sp in (("codes", w.codes, qs.codes), ("scales", w.scales, qs.scales)):
        for dim, (n, axes) in enumerate(zip(arr.shape, sp)):
            size = mesh_size(mesh, axes)
            if n % size:
                raise ValueError(f"{name}: the {w.fmt} {what} {tuple(arr.shape)} cannot be split over mesh axes "
                                 f"{axes} of size {size} along dim {dim}: shards must hold whole scale blocks")


def shardings_by_specs(tree, specs, mesh):
    """The NamedSharding of each array of `tree` (arrays or ShapeDtypeStructs) from its spec in `specs` (same
    structure, PartitionSpec leaves); quantized weights (quant.QArray) get a QArray of shardings for their codes,
    scales and per-tensor scalars from the logical weight's spec (quant.qarray.spec_for), and splits that cut
    scale blocks are refused."""

    def one(path, s, x):
        if is_qarray(x):
            check_quantized(jax.tree_util.keystr(path), x, s, mesh)
            return jax.tree.map(lambda sa: NamedSharding(mesh, sa), spec_for(s, x),
                                is_leaf=lambda v: isinstance(v, P))
        return NamedSharding(mesh, s)
    return jax.tree_util.tree_map_with_path(one, specs, tree, is_leaf=lambda s: isinstance(s, P))


def place_by_specs(tree, specs, mesh):
    """Place each array of `tree` by its spec in `specs` (shardings_by_specs)."""
    return jax.tree.map(_place, tree, shardings_by_specs(tree, specs, mesh))


