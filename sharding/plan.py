"""Memory plan of a configuration on a mesh, without allocating: per-device weight bytes by component, the KV
cache capacity in what memory remains, and whether it fits; optionally the compiled decode step's memory
analysis and the collectives XLA emitted.

Byte-accounting recipes (the quantizers themselves live in quant/):
- "bf16": everything bf16 (router bias f32);
- "fp8": DeepSeek's release: every linear of attention, dense MLP, experts and MTP in e4m3 with one f32 scale per
  128x128 block; embeddings, LM head, norms and router bf16;
- "nvfp4": NVIDIA's published DeepSeek-R1-FP4 recipe: dense-MLP, shared- and routed-expert linears in NVFP4
  (4.5 bits), MLA projections bf16, embeddings/head/router bf16, the MTP layer as released (fp8);
- "nvfp4_experts": routed experts NVFP4, every other linear fp8 as released.
Any recipe of quant/recipes.py is accepted too ("r1_fp4", "mxfp4_w4a4", "nvfp4_w4a16+attn", ...): its groups in
its format, every other linear bf16 (the emulation leaves them in the model dtype), an FP8 cache with "+kv_fp8".
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import NamedSharding

from model.cache import cache_bytes_per_token
from model.config import Config
from model.params import is_info, param_infos
from sharding.mesh import mesh_sizes
from sharding.rules import ShardingRules, check_divisible

RECIPES = ("bf16", "fp8", "nvfp4", "nvfp4_experts")
FP8_BLOCK = 1.0 + 4.0 / (128 * 128)  # e4m3 + one f32 scale per 128x128 block
NVFP4 = 0.5 + 1.0 / 16  # e2m1 + one e4m3 scale per 16 (the per-tensor f32 scale is negligible)
MXFP4 = 0.5 + 1.0 / 32


def _component(path: str) -> str:
    if path.startswith(".mtp"):
        return "mtp"
    if ".embed" == path or path.startswith(".lm_head"):
        return "embeddings"
    if ".attn" in path or "attn_norm" in path or "ffn_norm" in path:
        return "attention"
    if ".ffn.shared" in path:
        return "shared_experts"
    if ".ffn.we" in path:
        return "routed_experts"
    if ".ffn.w_router" in path or ".ffn.e_bias" in path:
        return "router"
    if path.startswith(".dense_layers.ffn"):
        return "dense_mlp"
    return "norms"


_GROUP = {"dense_mlp": "dense_mlp", "shared_experts": "shared", "routed_experts": "routed", "attention": "attn"}
_FORMAT_BYTES = {"nvfp4": NVFP4, "mxfp4": MXFP4, "fp8": FP8_BLOCK}


def _bytes_per_param(info, component: str, path: str, recipe) -> float:
    if path.endswith("e_bias"):
        return 4.0
    is_linear = len([a for a in info.logical_axes if a not in ("layers", "experts")]) >= 2
    if not isinstance(recipe, str):  # a quant.recipes.Recipe
        group = _GROUP.get(component)
        in_recipe = group in recipe.groups or (path.endswith(".attn.wo") and "attn_o" in recipe.groups)
        quantized = is_linear and component != "mtp" and recipe.weight_fmt is not None and in_recipe
        return _FORMAT_BYTES[recipe.weight_fmt] if quantized else 2.0
    if recipe == "bf16" or not is_linear or component in ("embeddings", "router") or "w_router" in path:
        return 2.0
    if recipe == "fp8" or component == "mtp":
        return FP8_BLOCK
    if recipe == "nvfp4":
        return NVFP4 if component in ("dense_mlp", "shared_experts", "routed_experts") else 2.0
    return NVFP4 if component == "routed_experts" else FP8_BLOCK  # nvfp4_experts


def plan(cfg: Config, mesh, *, recipe: str = "fp8", device_memory_gb: float = 80.0, reserve_frac: float = 0.08,
         rules: ShardingRules = ShardingRules()) -> dict:
    """Per-device bytes by component (the largest shard; all devices hold equal shards under these rules)."""
    kv_dtype = np.dtype("bfloat16")
    accounting = recipe
    if recipe not in RECIPES:
        from quant.recipes import get_recipe
        try:
            accounting = get_recipe(recipe)
        except ValueError:
            raise ValueError(f"unknown recipe {recipe!r}; choose from {RECIPES} or a quant recipe "
                             f"(quant/recipes.py)") from None
        kv_dtype = np.dtype("float8_e4m3fn") if accounting.kv_fp8 else kv_dtype
    check_divisible(cfg, mesh, rules)
    infos = param_infos(cfg, with_mtp=cfg.num_nextn_predict_layers > 0)
    per_component: dict[str, float] = {}
    total_global = mtp_global = 0.0
    for path, info in jax.tree_util.tree_flatten_with_path(infos, is_leaf=is_info)[0]:
        name = jax.tree_util.keystr(path)
        comp = _component(name)
        shard = NamedSharding(mesh, rules.spec(info.logical_axes)).shard_shape(info.shape)
        bpp = _bytes_per_param(info, comp, name, accounting)
        per_component[comp] = per_component.get(comp, 0.0) + math.prod(shard) * bpp
        total_global += math.prod(info.shape) * bpp
        mtp_global += math.prod(info.shape) * bpp if comp == "mtp" else 0.0
    weights = sum(per_component.values())
    main_total = total_global - mtp_global
    mem = device_memory_gb * 1e9
    free = mem * (1 - reserve_frac) - weights
    sizes = mesh_sizes(mesh)
    kv_token = cache_bytes_per_token(cfg, kv_dtype)  # replicated over expert x tensor, split over data
    return {"recipe": recipe, "mesh": sizes, "device_memory_gb": device_memory_gb, "per_device": per_component,
            "weights_per_device": weights, "weights_total": total_global, "weights_main_model": main_total,
            "reserve_frac": reserve_frac,
            "kv_bytes_per_token": kv_token, "kv_dtype": "fp8" if kv_dtype.itemsize == 1 else "bf16",
            "kv_tokens_per_data_shard": max(0, int(free // kv_token)),
            "kv_tokens_total": max(0, int(free // kv_token)) * sizes["data"], "fits": free > 0}


def format_plan(p: dict) -> str:
    gb = 1e9
    lines = [f"mesh {p['mesh']}, recipe {p['recipe']}, device memory {p['device_memory_gb']:.0f} GB",
             f"{'component':16} {'GB/device':>10}"]
    for k in ("attention", "dense_mlp", "routed_experts", "shared_experts", "router", "embeddings", "mtp", "norms"):
        if k in p["per_device"]:
            lines.append(f"{k:16} {p['per_device'][k] / gb:10.2f}")
    lines += [f"{'total':16} {p['weights_per_device'] / gb:10.2f}   (all devices: {p['weights_total'] / gb:.1f} GB; "
              f"main model without MTP {p['weights_main_model'] / gb:.1f} GB)",
              f"KV cache: {p['kv_bytes_per_token']:,} B/token ({p['kv_dtype']} latent, 61 layers), room for "
              f"{p['kv_tokens_total']:,} tokens after a {p['reserve_frac']:.0%} reserve",
              f"fits: {'yes' if p['fits'] else 'NO'}"]
    return "\n".join(lines)


_COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")


def compile_decode(cfg: Config, mesh, *, batch: int, max_len: int, rules: ShardingRules = ShardingRules()):
    """Lower and compile one decode step of the full model for `mesh` from abstract inputs (nothing allocated).

    Returns (memory analysis, {collective: count}, seconds to lower + compile)."""
    import time

    from model.cache import cache_shapes
    from model.forward import decode_fn
    from sharding.rules import cache_specs, param_specs

    check_divisible(cfg, mesh, rules, batch=batch)
    infos = param_infos(cfg, with_mtp=False)
    specs = param_specs(cfg, rules, with_mtp=False)
    abstract = jax.tree.map(lambda i, s: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=NamedSharding(mesh, s)),
                            infos, specs, is_leaf=is_info)
    cache = jax.tree.map(lambda c, s: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=NamedSharding(mesh, s)),
                         cache_shapes(cfg, batch, max_len), cache_specs(rules))
    tokens = jax.ShapeDtypeStruct((batch,), np.int32)
    t0 = time.perf_counter()
    lowered = jax.jit(decode_fn, static_argnames=("cfg", "mesh")).trace(abstract, cache, tokens, cfg=cfg,
                                                                        mesh=mesh).lower()
    compiled = lowered.compile()
    secs = time.perf_counter() - t0
    hlo = compiled.as_text()
    counts = {c: len(re.findall(rf"\b{c}(?:-start)?\(", hlo)) for c in _COLLECTIVES}
    return compiled.memory_analysis(), counts, secs


__all__ = ["plan", "format_plan", "compile_decode", "RECIPES"]
