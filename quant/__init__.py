"""Emulated FP8 / NVFP4 / MXFP4 quantization: not implemented yet (the byte accounting of the recipes lives in
sharding/plan.py)."""
