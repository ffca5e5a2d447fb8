"""Tolerances, by dtype, in one place. Model-level checks are relative to the logit scale (max |logit|)."""

import numpy as np

OP_ATOL = {"float32": 1e-5, "bfloat16": 1e-2}
OP_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}
MODEL_REL = {"float32": 1e-4, "bfloat16": 2e-2}  # max |ours - ref| <= MODEL_REL * max |ref|


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def assert_logits_close(ours, ref, dtype: str = "float32"):
    err = rel_err(ours, ref)
    assert err <= MODEL_REL[dtype], f"max |ours - ref| / max |ref| = {err:.3e} > {MODEL_REL[dtype]:.0e}"
