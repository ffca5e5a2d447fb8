"""Causal MLA prefill attention: `mla_prefill` (Pallas, kernel.py) and its plain-jnp twin `mla_prefill_reference`
(reference.py)."""

from pallas_kernels.mla_prefill.kernel import BlockSizes, check_shapes, mla_prefill, smem_bytes
from pallas_kernels.mla_prefill.reference import mla_prefill_reference

__all__ = ["BlockSizes", "check_shapes", "mla_prefill", "mla_prefill_reference", "smem_bytes"]
