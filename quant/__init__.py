"""Emulated low-precision formats for DeepSeek-R1, bit-faithful and stored packed: FP8 (E4M3, DeepSeek's 128x128 /
1x128 blocks), NVFP4 (E2M1 with E4M3 scales per 16 and an FP32 tensor scale) and MXFP4 (E2M1 with E8M0 scales per
32); the QArray pytree; the named recipes. This package knows nothing of the model: model/quantize.py applies a
recipe to the parameters (`model.quantize_params`) and calibrates static scales (`model.calibrate`).

    import jax.numpy as jnp
    from quant import dequantize, quantize
    w = jnp.linspace(-1.0, 1.0, 64 * 32).reshape(64, 32)          # [K, N], reduced over K
    q = quantize(w, "nvfp4", k_axis=-2)                             # codes [32, 32] uint8, scales [32, 4] E4M3
    err = jnp.linalg.norm(dequantize(q) - w) / jnp.linalg.norm(w)
    assert 0.05 < float(err) < 0.15                                 # 11% relative RMS error on this ramp

`formats` holds the element and block rules and the table of formats, `qarray` the QArray pytree, `recipes` the
named recipes.
"""

from quant.formats import FORMATS, Format
from quant.qarray import QArray, dequantize, is_qarray, quantize
from quant.recipes import RECIPES, Recipe, Rule, get_recipe, weight_bytes

__all__ = ["FORMATS", "Format", "QArray", "dequantize", "is_qarray", "quantize", "RECIPES", "Recipe", "Rule",
           "get_recipe", "weight_bytes"]
