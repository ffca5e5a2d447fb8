"""Meshes from a spec string such as "data=1,expert=8,tensor=1", over jax.make_mesh.

The three axes are always present (size 1 when unused), so partition rules can name them unconditionally.
Axes are Auto (GSPMD propagation); expert parallelism is explicit through shard_map (sharding/ep.py).
A mesh of other axes (jax.make_mesh) works too, with sharding rules that name its axes.
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
    """A mesh with the axes data, expert and tensor (size 1 where not given) from "expert=4,tensor=2" or
    {"expert": 4, "tensor": 2}; unknown axis names and sizes that do not use every device are refused."""
    if isinstance(spec, str):
        sizes = parse_mesh_spec(spec)
    else:
        unknown = sorted(set(spec) - set(AXES))
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown} in {spec}; axes are {AXES}")
        sizes = parse_mesh_spec(",".join(f"{k}={v}" for k, v in spec.items()))
    devices = devices if devices is not None else jax.devices()
    need = math.prod(sizes.values())
    if need != len(devices):
        raise ValueError(f"mesh {sizes} needs {need} devices, but {len(devices)} are available")
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))
