"""Explicit mesh sharding: mesh construction, the logical-to-mesh partition rules, and expert parallelism.

    mesh = make_mesh("data=1,expert=8,tensor=1")
    params = shard_params(params, cfg, mesh)
    logits, cache = prefill(params, shard_cache(cache, mesh), tokens, lengths, cfg=cfg, mesh=mesh)
"""

from sharding.mesh import AXES, EPMesh, make_mesh, mesh_sizes, parse_mesh_spec
from sharding.rules import (
                            DEFAULT_RULES,
                            ShardingRules,
                            cache_specs,
                            check_divisible,
                            param_specs,
                            shard_cache,
                            shard_params,
)

__all__ = ["AXES", "EPMesh", "make_mesh", "mesh_sizes", "parse_mesh_spec", "DEFAULT_RULES", "ShardingRules",
           "cache_specs", "check_divisible", "param_specs", "shard_cache", "shard_params"]
