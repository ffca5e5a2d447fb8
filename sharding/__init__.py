"""Meshes, the logical-axis rules, and expert parallelism as a wrapper: nothing here knows the model
(model/placement.py places its parameters and caches by these rules).

    from sharding import make_mesh
    mesh = make_mesh("data=1,expert=8,tensor=1")
"""

from sharding.ep import expert_parallel, resolve_dispatch
from sharding.mesh import AXES, make_mesh, mesh_sizes, parse_mesh_spec
from sharding.rules import DEFAULT_RULES, ShardingRules, check_quantized, flat_axes, mesh_size, place_by_specs

__all__ = ["AXES", "make_mesh", "mesh_sizes", "parse_mesh_spec", "DEFAULT_RULES", "ShardingRules", "check_quantized",
           "flat_axes", "mesh_size", "place_by_specs", "expert_parallel", "resolve_dispatch"]
