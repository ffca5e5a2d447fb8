"""Pallas kernels for the expert grouped matmul and MLA attention: not implemented yet. The plain-jnp paths they
will be tested against are model/moe.py (grouped_swiglu) and model/mla.py (attend_absorbed, attend_naive)."""
