"""Absorbed MLA decode attention: `mla_decode` (Pallas, kernel.py) and its plain-jnp twin `mla_decode_reference`
(reference.py)."""

from pallas_kernels.mla_decode.kernel import BlockSizes, check_shapes, combine, mla_decode, smem_bytes
from pallas_kernels.mla_decode.reference import mla_decode_reference

__all__ = ["BlockSizes", "check_shapes", "combine", "mla_decode", "mla_decode_reference", "smem_bytes"]
