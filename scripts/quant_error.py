"""Quantization error of each format on Gaussian and heavy-tailed (Student-t, 3 d.o.f.) data: SQNR in dB of one
quantize-dequantize round trip of a weight, and of a matmul output with weights only (W4A16) or weights and
activations (W4A4 / W8A8) quantized. A table, and JSON with --json.

    python scripts/quant_error.py --json docs/quant_error.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from model import command
from quant import formats as F
from quant.qarray import dequantize, quantize, quantize_activation
from quant.recipes import mxfp4_search_exponents, nvfp4_search_block_scales


def sqnr(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(10 * np.log10(np.sum(x ** 2) / np.sum((x - y) ** 2)))


def data(dist: str, shape, seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, shape) if dist == "student_t3" else rng.standard_normal(shape)
    return jnp.asarray(x, jnp.float32)


def weight_rows(w):
    """(label, dequantized) for each format and scale rule; w [K, N] with K the reduction axis."""
    out = []
    for fmt in ("nvfp4", "mxfp4", "fp8"):
        out.append((fmt, dequantize(quantize(w, fmt, k_axis=-2))))
    wt = w.T
    s_t = F.nvfp4_tensor_scale(jnp.max(jnp.abs(w)))
    out.append(("nvfp4 + scale search", dequantize(quantize(wt, "nvfp4", k_axis=-1,
                                                            block_scales=nvfp4_search_block_scales(wt, s_t))).T))
    out.append(("mxfp4 round-up scale", dequantize(quantize(w, "mxfp4", k_axis=-2, mx_rule="ceil"))))
    out.append(("mxfp4 + scale search", dequantize(quantize(wt, "mxfp4", k_axis=-1,
                                                            block_scales=mxfp4_search_exponents(wt))).T))
    return out


def main(argv=None):
    ap = command.parser("quant_error", __doc__)
    ap.add_argument("--size", type=int, default=1024, help="weights are size x size")
    ap.add_argument("--tokens", type=int, default=256, help="activation rows for the matmul figures")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = {"size": args.size, "tokens": args.tokens, "weights": {}, "matmul": {}}
    print(f"{'weight round trip, SQNR dB':32} {'gaussian':>9} {'student_t3':>11}")
    table = {}
    for dist in ("gaussian", "student_t3"):
        w = data(dist, (args.size, args.size), 0)
        for label, d in weight_rows(w):
            table.setdefault(label, {})[dist] = sqnr(w, d)
    for label, v in table.items():
        print(f"{label:32} {v['gaussian']:9.2f} {v['student_t3']:11.2f}")
    res["weights"] = table
    print(f"\n{'matmul output, SQNR dB':32} {'gaussian':>9} {'student_t3':>11}")
    mm = {}
    for dist in ("gaussian", "student_t3"):
        w = data(dist, (args.size, args.size), 1) * 0.02
        x = data("gaussian", (args.tokens, args.size), 2)
        x = x.at[:, :: max(args.size // 100, 1)].multiply(30.0)  # 1% outlier channels at 30x, as activations have
        ref = x @ w
        for fmt in ("fp8", "nvfp4", "mxfp4"):
            wd = dequantize(quantize(w, fmt, k_axis=-2))
            a = "W8A8" if fmt == "fp8" else "W4A4"
            mm.setdefault(f"{fmt} {'W8A16' if fmt == 'fp8' else 'W4A16'}", {})[dist] = sqnr(ref, x @ wd)
            mm.setdefault(f"{fmt} {a}", {})[dist] = sqnr(ref, quantize_activation(x, fmt) @ wd)
    for label, v in mm.items():
        print(f"{label:32} {v['gaussian']:9.2f} {v['student_t3']:11.2f}")
    res["matmul"] = mm
    res["jax"] = jax.__version__
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    command.run(main)
