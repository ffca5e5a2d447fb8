"""Grouped matmul for the routed experts: `grouped_matmul` (Pallas, kernel.py) and its plain-jnp twin
`grouped_matmul_reference` (reference.py)."""

from pallas_kernels.grouped_matmul.kernel import BlockSizes, check_shapes, grouped_matmul, smem_bytes, tile_map
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference

__all__ = ["BlockSizes", "check_shapes", "grouped_matmul", "grouped_matmul_reference", "smem_bytes", "tile_map"]
