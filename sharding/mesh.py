"""Meshes from a spec string such as "data=1,expert=8,tensor=1", over jax.make_mesh.

The three axes are always present (size 1 when unused), so partition rules can name them unconditionally.
Axes are Auto (GSPMD propagation); expert parallelism is explicit through shard_map (sharding/ep.py).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "expert", "tensor")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,expert=4' -> {'data': 2, 'expert': 4, 'tensor': 1}."""
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; axes are {AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name!r} needs an integer size, got {value!r}") from None
        if sizes[name] < 1:
            raise ValueError(f"mesh axis {name!r} must be >= 1, got {sizes[name]}")
    return sizes


def make_mesh(spec: str | dict[str, int], devices=None) -> Mesh:
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else {**dict.fromkeys(AXES, 1), **spec}
    devices = devices if devices is not None else jax.devices()
    need = math.prod(sizes.values())
    if need != len(devices):
        raise ValueError(f"mesh {sizes} needs {need} devices, but {len(devices)} are available")
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


class EPMesh:
    """A mesh plus the expert-parallel dispatch to use: "psum" (tokens replicated across expert ranks, partial
    outputs reduced), "all_to_all" (tokens sent to the ranks owning their experts and back), or "auto"
    (all_to_all when the step's tokens split evenly over the data x expert ranks with at least `a2a_min_tokens`
    each, psum otherwise; measured in docs/benchmarks.md).
    Hashable, so it passes as a static argument wherever a mesh does."""

    def __init__(self, mesh, dispatch: str = "auto", a2a_min_tokens: int = 1):
        if dispatch not in ("auto", "psum", "all_to_all"):
            raise ValueError(f"dispatch must be 'auto', 'psum' or 'all_to_all', got {dispatch!r}")
        self.mesh, self.dispatch, self.a2a_min_tokens = mesh, dispatch, a2a_min_tokens

    @property
    def shape(self):
        return self.mesh.shape

    def _key(self):
        return (self.mesh, self.dispatch, self.a2a_min_tokens)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, EPMesh) and self._key() == other._key()

    def __repr__(self):
        return f"EPMesh({mesh_sizes(self.mesh)}, dispatch={self.dispatch!r})"
