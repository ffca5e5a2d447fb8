"""The model on a mesh: PartitionSpecs from the declarations' logical axes and the sharding rules, divisibility
checks before anything compiles, and the placement of parameters and caches.

    mesh = make_mesh("expert=4,tensor=2")
    params = shard_params(params, cfg, mesh)
    cache = shard_cache(init_cache(cfg, batch, max_len), mesh)

A vocabulary that the mesh axes of `vocab` do not divide is padded here: the embedding gains zero rows and the LM
head zero columns up to the next multiple, and the model slices its logits back to the real vocabulary
(model/forward.py, `lm_logits`), so no padded id is ever scored or sampled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.cache import Cache
from model.config import Config
from model.params import Params, is_info, param_infos
from sharding.mesh import mesh_sizes
from sharding.rules import ShardingRules, mesh_size, place_by_specs


def param_specs(cfg: Config, rules: ShardingRules = ShardingRules(), *, with_mtp: bool | None = None) -> Params:
    """A Params tree of PartitionSpecs, from the declarations' logical axes."""
    return jax.tree.map(lambda i: rules.spec(i.logical_axes), param_infos(cfg, with_mtp=with_mtp), is_leaf=is_info)


def cache_specs(rules: ShardingRules = ShardingRules(), fp8: bool = False) -> Cache:
    """The latent cache split over the batch axes only (every head reads the whole latent)."""
    return Cache(c_kv=rules.spec(("layers", "batch", None, None)), k_pe=rules.spec(("layers", "batch", None, None)),
                 lengths=rules.spec(("batch",)), kv_scale=P() if fp8 else None)


def check_divisible(cfg: Config, mesh, rules: ShardingRules = ShardingRules(), *, batch: int | None = None):
    """Clear errors, before any compilation, for a mesh that does not divide the config (the vocabulary is padded
    instead, see the module docstring)."""
    rules.check_mesh(mesh)
    problems = []
    checks = [("n_routed_experts", cfg.n_routed_experts, "experts"),
              ("num_attention_heads", cfg.num_attention_heads, "heads"),
              ("moe_intermediate_size", cfg.moe_intermediate_size, "expert_ffn"),
              ("intermediate_size", cfg.intermediate_size, "ffn"),
              ("moe_intermediate_size * n_shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts,
               "shared_ffn")]
    if batch is not None:
        checks.append(("batch", batch, "batch"))
    for name, value, logical in checks:
        axes = rules.axes(logical)
        n = mesh_size(mesh, axes)
        if value % n:
            problems.append(f"{name}={value} is not divisible by mesh axes {axes} of size {n}")
    if problems:
        raise ValueError(f"mesh {mesh_sizes(mesh)} does not fit the config: " + "; ".join(problems))


def padded_vocab(cfg: Config, mesh, rules: ShardingRules = ShardingRules()) -> int:
    """The vocabulary rounded up to a multiple of the mesh axes that split it."""
    n = mesh_size(mesh, rules.axes("vocab"))
    return -(-cfg.vocab_size // n) * n


def shard_params(params: Params, cfg: Config, mesh, rules: ShardingRules = ShardingRules()) -> Params:
    """Place parameters by the rules (quantized weights: sharding.place_by_specs), the vocabulary padded to what
    the mesh divides."""
    check_divisible(cfg, mesh, rules)
    pad = padded_vocab(cfg, mesh, rules) - params.embed.shape[0]
    if pad > 0:
        params = params.replace(embed=jnp.pad(params.embed, ((0, pad), (0, 0))),
                                lm_head=jnp.pad(params.lm_head, ((0, 0), (0, pad))))
    return place_by_specs(params, param_specs(cfg, rules, with_mtp=params.mtp is not None), mesh)


def shard_cache(cache: Cache, mesh, rules: ShardingRules = ShardingRules()) -> Cache:
    rules.check_mesh(mesh)
    return place_by_specs(cache, cache_specs(rules, fp8=cache.kv_scale is not None).replace(span=cache.span), mesh)
