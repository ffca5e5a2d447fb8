"""One table from logical axis names (declared on every parameter in model/params.py and on the cache) to mesh
axes, and the placement of parameters and caches on a mesh.

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

from model.cache import Cache
from model.config import Config
from model.params import Params, is_info, param_infos
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


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    rules: tuple[tuple[str, MeshAxes], ...] = tuple(DEFAULT_RULES.items())

    def axes(self, logical: str | None) -> MeshAxes:
        return dict(self.rules).get(logical) if logical is not None else None

    def spec(self, logical_axes: tuple[str | None, ...]) -> P:
        out, used = [], set()
        for name in logical_axes:
            mesh_axes = self.axes(name)
            flat = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
            if used & set(flat):
                raise ValueError(f"logical axes {logical_axes} map mesh axes {flat} twice")
            used |= set(flat)
            out.append(mesh_axes)
        return P(*out)


def param_specs(cfg: Config, rules: ShardingRules = ShardingRules(), *, with_mtp: bool | None = None) -> Params:
    """A Params tree of PartitionSpecs, from the declarations' logical axes."""
    return jax.tree.map(lambda i: rules.spec(i.logical_axes), param_infos(cfg, with_mtp=with_mtp), is_leaf=is_info)


def cache_specs(rules: ShardingRules = ShardingRules()) -> Cache:
    return Cache(c_kv=rules.spec(("layers", "batch", None, None)), k_pe=rules.spec(("layers", "batch", None, None)),
                 lengths=rules.spec(("batch",)))


def _mesh_size(mesh, axes: MeshAxes) -> int:
    sizes = mesh_sizes(mesh)
    flat = (axes,) if isinstance(axes, str) else (axes or ())
    n = 1
    for a in flat:
        n *= sizes[a]
    return n


def check_divisible(cfg: Config, mesh, rules: ShardingRules = ShardingRules(), *, batch: int | None = None):
    """Clear errors, before any compilation, for a mesh that does not divide the config."""
    mesh = getattr(mesh, "mesh", mesh)  # an EPMesh wraps a Mesh
    problems = []
    checks = [("n_routed_experts", cfg.n_routed_experts, "experts"),
              ("num_attention_heads", cfg.num_attention_heads, "heads"),
              ("vocab_size", cfg.vocab_size, "vocab"), ("moe_intermediate_size", cfg.moe_intermediate_size,
                                                         "expert_ffn"),
              ("intermediate_size", cfg.intermediate_size, "ffn"),
              ("moe_intermediate_size * n_shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts,
               "shared_ffn")]
    if batch is not None:
        checks.append(("batch", batch, "batch"))
    for name, value, logical in checks:
        axes = rules.axes(logical)
        n = _mesh_size(mesh, axes)
        if value % n:
            problems.append(f"{name}={value} is not divisible by mesh axes {axes} of size {n}")
    if problems:
        raise ValueError(f"mesh {mesh_sizes(mesh)} does not fit the config: " + "; ".join(problems))


def _place(x, sharding: NamedSharding):
    """device_put, or (multi-process) assemble the global array from this host's copy of the full value."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _check_quantized(name: str, w, spec: P, mesh) -> None:
    """A quantized weight splits over the mesh only at whole scale blocks."""
    from quant.qarray import spec_for

    qs = spec_for(spec, w)
    if w.fmt == "fp8":
        rows = int(np.prod(w.codes.shape[w.batch_ndim:-1]))
        for what, n, axes in (("output rows", rows, qs.scales[w.batch_ndim]), ("reduction axis", w.k,
                                                                              qs.scales[w.batch_ndim + 1])):
            size = _mesh_size(mesh, axes)
            if size > 1 and (n % size or (n // size) % 128):
                raise ValueError(f"{name}: FP8 128x128 tiles cannot be split over mesh axes {axes} of size {size}: "
                                 f"{what} {n} / {size} is not a multiple of 128")
    for what, arr, sp in (("codes", w.codes, qs.codes), ("scales", w.scales, qs.scales)):
        for dim, (n, axes) in enumerate(zip(arr.shape, sp)):
            size = _mesh_size(mesh, axes)
            if n % size:
                raise ValueError(f"{name}: the {w.fmt} {what} {tuple(arr.shape)} cannot be split over mesh axes "
                                 f"{axes} of size {size} along dim {dim}: shards must hold whole scale blocks")


def place_by_specs(params: Params, specs: Params, mesh) -> Params:
    """Place each parameter by its logical spec; quantized weights (quant.QArray) place their codes, scales and
    per-tensor scalars by the logical weight's spec (quant.qarray.spec_for), refusing splits that cut scale blocks."""
    from quant.qarray import is_qarray, spec_for

    def place(path, s, x):
        if is_qarray(x):
            _check_quantized(jax.tree_util.keystr(path), x, s, mesh)
            return jax.tree.map(lambda a, sa: _place(a, NamedSharding(mesh, sa)), x, spec_for(s, x))
        return _place(x, NamedSharding(mesh, s))
    return jax.tree_util.tree_map_with_path(place, specs, params, is_leaf=lambda s: isinstance(s, P))


def shard_params(params: Params, cfg: Config, mesh, rules: ShardingRules = ShardingRules()) -> Params:
    """Place parameters by the rules (see `place_by_specs` for quantized weights)."""
    mesh = getattr(mesh, "mesh", mesh)
    check_divisible(cfg, mesh, rules)
    return place_by_specs(params, param_specs(cfg, rules, with_mtp=params.mtp is not None), mesh)


def shard_cache(cache: Cache, mesh, rules: ShardingRules = ShardingRules()) -> Cache:
    mesh = getattr(mesh, "mesh", mesh)
    specs = cache_specs(rules)
    if cache.per_layer:  # one buffer per layer: the stacked spec without its layer axis
        specs = specs.replace(c_kv=(P(*tuple(specs.c_kv)[1:]),) * len(cache.c_kv),
                              k_pe=(P(*tuple(specs.k_pe)[1:]),) * len(cache.k_pe))
    if cache.kv_scale is not None:
        specs = specs.replace(kv_scale=P())
    return jax.tree.map(lambda x, s: _place(x, NamedSharding(mesh, s)), cache, specs)
