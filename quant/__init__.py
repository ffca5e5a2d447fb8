"""Emulated low-precision formats for DeepSeek-R1: FP8 (E4M3, DeepSeek's 128x128 / 1x128 blocks), NVFP4 (E2M1 with
E4M3 scales per 16 and an FP32 tensor scale) and MXFP4 (E2M1 with E8M0 scales per 32), bit-faithful, stored
packed; recipes that quantize a parameter tree; PTQ calibration.

    from quant import quantize_params, calibrate
    qparams = quantize_params(params, "r1_fp4", calibrate(params, cfg, prompts, "r1_fp4"))

`formats` holds the element and block rules, `qarray` the QArray pytree, `recipes` the named recipes,
`calibrate` the activation-amax pass.
"""

from quant.qarray import QArray, dequantize, is_qarray, quantize  # noqa: F401
from quant.recipes import RECIPES, Recipe, get_recipe, quantize_params, weight_bytes  # noqa: F401
