"""How fast XLA on this machine reads an expert's weights for one token, by how the matrix reaches the dot.

Batch-1 decode of a MoE is a string of matrix-vector products on matrices picked at run time. This measures the
read rate (matrix bytes / time) of y = x W for E expert matrices of D x M, float32, summed over all experts:

- `separate arrays`: each expert its own argument (no indexing; the best a per-expert dot can do),
- `dynamic index, loop`: experts stacked [E, D, M], read one by one as W[i] in a fori_loop (what a decode step
  does with the experts it routed to),
- `static slices`: the stack sliced at fixed indices,
- `one dot`: the stack as one [E*M, D] matrix times x (one large matrix-vector product; the bandwidth reference).

    python scripts/bench_matvec.py --json results/bench_matvec.json
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from model.bench import median_time


def _loop(w, x):
    return jax.lax.fori_loop(0, w.shape[0], lambda i, acc: acc + x @ w[i], jnp.zeros(w.shape[2], w.dtype))


def forms(n_exp: int):
    """name -> (jitted fn, how its argument is built from the stack [E, D, M])."""
    return {
        "separate arrays": (jax.jit(lambda ws, x: sum(x @ w for w in ws)), lambda w: list(w)),
        "dynamic index, loop": (jax.jit(_loop), lambda w: w),
        "static slices": (jax.jit(lambda w, x: sum(x @ w[i] for i in range(n_exp))), lambda w: w),
        "one dot": (jax.jit(lambda w, x: w @ x), lambda w: jnp.swapaxes(w, 1, 2).reshape(-1, w.shape[1])),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1024x512", "1024x2048"],
                    help="D x M of one expert matrix (1024x512: the `small` preset's experts)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, float32, "
          f"{args.experts} experts, median of {args.repeats}\n")
    print(f"{'D x M':>10}  {'MB each':>7}  {'form':<20} {'GB/s':>7}")
    rows = []
    for shape in args.shapes:
        d, m = (int(v) for v in shape.split("x"))
        w = jax.random.normal(jax.random.key(0), (args.experts, d, m), jnp.float32)
        x = jax.random.normal(jax.random.key(1), (d,), jnp.float32)
        for name, (fn, build) in forms(args.experts).items():
            arg = jax.block_until_ready(build(w))
            gbs = w.nbytes / median_time(lambda fn=fn, arg=arg, x=x: jax.block_until_ready(fn(arg, x)),
                                          args.repeats) / 1e9
            rows.append({"d": d, "m": m, "form": name, "gb_s": gbs})
            print(f"{shape:>10}  {d * m * 4 / 2**20:7.1f}  {name:<20} {gbs:7.2f}")
            del arg
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"jax": jax.__version__, "cores": os.cpu_count(),
                                               "experts": args.experts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
