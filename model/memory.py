"""Memory plan of a configuration on a mesh, without allocating: per-device weight bytes by parameter group, the
KV cache capacity in what memory remains, and whether it fits; optionally the compiled decode step's memory
analysis and the collectives XLA emitted.

The bytes are those of the quantized tree itself: the recipe (quant/recipes.py, the one registry) is applied to
the abstract parameters under `jax.eval_shape` (model/quantize.py; nothing allocated), and every stored array
(codes, scales, per-matrix scalars, plain weights) is counted at its shard's shape under the sharding rules.
"""

from __future__ import annotations

import math
import re
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from model.cache import cache_bytes_per_token, cache_shapes
from model.config import Config
from model.forward import decode_fn
from model.params import abstract_params, is_info, param_infos
from model.placement import cache_specs, check_divisible, param_specs
from model.plan import ExecutionPlan
from model.quantize import quantize_params
from quant.qarray import is_qarray, spec_for
from quant.recipes import get_recipe
from sharding.mesh import mesh_sizes
from sharding.rules import ShardingRules

COMPONENTS = ("attention", "dense_mlp", "routed", "shared", "router", "embedding", "mtp", "norm")


def quantized_abstract(cfg: Config, recipe: str):
    """The parameter tree as the recipe stores it, as ShapeDtypeStructs (QArrays where quantized)."""
    return jax.eval_shape(lambda p: quantize_params(p, cfg, recipe), abstract_params(cfg))


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def stored_arrays(cfg: Config, mesh, recipe, rules: ShardingRules = ShardingRules()):
    """(leaf path, component, stored array as a ShapeDtypeStruct, its per-device shard shape) for every array the
    recipe stores (QArray codes, scales and scalars one by one)."""
    check_divisible(cfg, mesh, rules)
    with_mtp = cfg.num_nextn_predict_layers > 0
    tree = quantized_abstract(cfg, recipe)
    infos = jax.tree_util.tree_flatten_with_path(param_infos(cfg, with_mtp=with_mtp), is_leaf=is_info)[0]
    specs = jax.tree.leaves(param_specs(cfg, rules, with_mtp=with_mtp), is_leaf=lambda s: isinstance(s, P))
    leaves = jax.tree.leaves(tree, is_leaf=is_qarray)
    for (path, info), spec, leaf in zip(infos, specs, leaves):
        name = jax.tree_util.keystr(path)
        comp = "mtp" if name.startswith(".mtp") else info.group
        arr_specs = jax.tree.leaves(spec_for(spec, leaf), is_leaf=lambda s: isinstance(s, P))
        for a, s in zip(jax.tree.leaves(leaf), arr_specs):
            yield name, comp, a, NamedSharding(mesh, s).shard_shape(a.shape)


def restore_plan(cfg: Config, mesh, *, recipe: str = "fp8_w8a8", disk_gb_s: float = 2.0,
                 rules: ShardingRules = ShardingRules()) -> dict:
    """Restoring a converted (layered) checkpoint onto the mesh: what each device reads, what all read together
    (an array replicated over k devices is read k times), the time at a disk bandwidth, and the device peak
    during the restore (its weights plus one layer's shard, model/io/layered.py)."""
    r = get_recipe(recipe)
    n_dev = mesh.devices.size
    layers = {"dense_layers": cfg.first_k_dense_replace,
              "moe_layers": cfg.num_hidden_layers - cfg.first_k_dense_replace}
    per_device = on_disk = 0
    per_layer = dict.fromkeys(layers, 0.0)
    for path, _, a, shard in stored_arrays(cfg, mesh, r, rules):
        b = _nbytes(shard, a.dtype)
        per_device += b
        on_disk += _nbytes(a.shape, a.dtype)
        stack = path[1:].partition(".")[0]
        if stack in layers:
            per_layer[stack] += b / layers[stack]
    read = per_device * n_dev
    return {"recipe": r.name, "mesh": mesh_sizes(mesh), "on_disk": on_disk, "read_per_device": per_device,
            "read_total": read, "disk_gb_s": disk_gb_s, "seconds": read / (disk_gb_s * 1e9),
            "layer_per_device": max(per_layer.values()), "device_peak": per_device + max(per_layer.values())}


def format_restore(p: dict) -> str:
    gb = 1e9
    return "\n".join([
        f"restore of a converted checkpoint ({p['recipe']}) onto {p['mesh']}, each device reading its own shards:",
        f"  on disk          {p['on_disk'] / gb:10.1f} GB",
        f"  read per device  {p['read_per_device'] / gb:10.1f} GB",
        f"  read in all      {p['read_total'] / gb:10.1f} GB   (replicated arrays read once per device)",
        f"  time             {p['seconds']:10.0f} s    at {p['disk_gb_s']:g} GB/s from disk",
        f"  device peak      {p['device_peak'] / gb:10.1f} GB   (weights + one layer's shard, "
        f"{p['layer_per_device'] / gb:.2f} GB)"])


def plan(cfg: Config, mesh, *, recipe: str = "fp8_w8a8", device_memory_gb: float = 80.0,
         reserve_frac: float = 0.08, rules: ShardingRules = ShardingRules()) -> dict:
    """Per-device bytes by component (the largest shard; all devices hold equal shards under these rules)."""
    r = get_recipe(recipe)  # unknown names raise here, naming the registry
    per_component = dict.fromkeys(COMPONENTS, 0.0)
    total = mtp = 0.0
    for _, comp, a, shard in stored_arrays(cfg, mesh, r, rules):
        per_component[comp] += _nbytes(shard, a.dtype)
        total += _nbytes(a.shape, a.dtype)
        mtp += _nbytes(a.shape, a.dtype) if comp == "mtp" else 0
    weights = sum(per_component.values())
    free = device_memory_gb * 1e9 * (1 - reserve_frac) - weights
    sizes = mesh_sizes(mesh)
    kv_dtype = np.dtype("float8_e4m3fn") if r.kv_fp8 else np.dtype(cfg.param_dtype)
    kv_token = cache_bytes_per_token(cfg, kv_dtype)  # replicated over expert x tensor, split over data
    return {"recipe": r.name, "mesh": sizes, "device_memory_gb": device_memory_gb,
            "per_device": {k: v for k, v in per_component.items() if v}, "weights_per_device": weights,
            "weights_total": total, "weights_main_model": total - mtp, "reserve_frac": reserve_frac,
            "kv_bytes_per_token": kv_token, "kv_dtype": "fp8" if r.kv_fp8 else kv_dtype.name,
            "kv_tokens_per_data_shard": max(0, int(free // kv_token)),
            "kv_tokens_total": max(0, int(free // kv_token)) * sizes.get("data", 1), "fits": free > 0}


def format_plan(p: dict, cfg: Config) -> str:
    gb = 1e9
    lines = [f"mesh {p['mesh']}, recipe {p['recipe']}, device memory {p['device_memory_gb']:.0f} GB",
             f"{'component':16} {'GB/device':>10}"]
    lines += [f"{k:16} {v / gb:10.2f}" for k, v in p["per_device"].items()]
    lines += [f"{'total':16} {p['weights_per_device'] / gb:10.2f}   (all devices: {p['weights_total'] / gb:.1f} GB; "
              f"main model without MTP {p['weights_main_model'] / gb:.1f} GB)",
              f"KV cache: {p['kv_bytes_per_token']:,} B/token ({p['kv_dtype']} latent, {cfg.num_hidden_layers} "
              f"layers), room for {p['kv_tokens_total']:,} tokens after a {p['reserve_frac']:.0%} reserve",
              f"fits: {'yes' if p['fits'] else 'NO'}"]
    return "\n".join(lines)


_COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")


def compile_decode(cfg: Config, mesh, *, batch: int, max_len: int, rules: ShardingRules = ShardingRules()):
    """Lower and compile one decode step of the full model for `mesh` from abstract inputs (nothing allocated).

    Returns (memory analysis, {collective: count}, seconds to lower + compile)."""
    check_divisible(cfg, mesh, rules, batch=batch)
    infos = param_infos(cfg, with_mtp=False)
    specs = param_specs(cfg, rules, with_mtp=False)
    abstract = jax.tree.map(lambda i, s: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=NamedSharding(mesh, s)),
                            infos, specs, is_leaf=is_info)
    cache = jax.tree.map(lambda c, s: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=NamedSharding(mesh, s)),
                         cache_shapes(cfg, batch, max_len), cache_specs(rules))
    tokens = jax.ShapeDtypeStruct((batch,), np.int32)
    plan_ = ExecutionPlan(mesh=mesh, rules=rules)
    t0 = time.perf_counter()
    lowered = jax.jit(decode_fn, static_argnames=("cfg", "plan")).trace(abstract, cache, tokens, cfg=cfg,
                                                                        plan=plan_).lower()
    compiled = lowered.compile()
    secs = time.perf_counter() - t0
    hlo = compiled.as_text()
    counts = {c: len(re.findall(rf"\b{c}(?:-start)?\(", hlo)) for c in _COLLECTIVES}
    return compiled.memory_analysis(), counts, secs


__all__ = ["compile_decode", "format_plan", "plan", "quantized_abstract"]
