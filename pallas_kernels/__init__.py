"""Pallas kernels for the routed experts and MLA attention, on the Triton backend: compiled on a GPU, interpret mode
elsewhere. One folder per kernel: `kernel.py` (the kernel, its `BlockSizes` with a default rule, its shared-memory
estimate and the jitted wrapper that checks shapes, offsets and shared memory before lowering) and `reference.py`
(the plain-jnp twin it is tested against). `common.py` holds the target's limits and the shared checks; `ops.py`
puts the kernels behind the model's interfaces (`backend="pallas"`).
"""

from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference
from pallas_kernels.mla_decode import mla_decode, mla_decode_reference
from pallas_kernels.mla_prefill import mla_prefill, mla_prefill_reference

__all__ = ["grouped_matmul", "grouped_matmul_reference", "mla_decode", "mla_decode_reference", "mla_prefill",
           "mla_prefill_reference"]
