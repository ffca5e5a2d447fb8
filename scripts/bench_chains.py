"""What chains of matrix-vector products like a decode step's read on several CPU devices at once, against the
meter that scripts/bench_decode.py compares decode with (model.bench.MatvecBandwidth: one float32 256 MiB
product on one device).

Every case runs on --devices host devices at once, one program per device under `jax.shard_map` (as the
tensor-parallel decode does, sharding/tp.py), as a dependent chain: each product's input depends on the last
one's output, so the products run one after another as in a decode step. A case repeats its unit (one or a few
matrices) until each device holds about --mib-per-device of weights. Rounds interleave the cases with meter
samples; the table gives medians over the rounds and each case's median share of the meter.

    python scripts/bench_chains.py --rounds 9 --json docs/bench_chains.json

Cases, per device (D = --width, 1024 as in `small`; x @ W: weights stored [in, out] as this project stores them,
W @ x: stored [out, in] as PyTorch does):
    one product       W [rows, 8 D] @ x: one product over all the MiB, rows of 8 D (the meter's form)
    x @ W [D, D/4]    1 MiB products at D = 1024 (an expert's gate or up half on two devices)
      in pairs / fours  the same products, two or four at a time independent of each other (as gate and up are)
    x @ W [D, 4 D]    16 MiB products at D = 1024
    experts [in,out]  gate and up [D, D/4], SwiGLU, down [D/4, D]: a routed expert's half on two devices
    experts [out,in]  the same stored [out, in]
    head x @ W        [D, 16 D]: half the LM head of `small` on two devices
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharding.tp import use_host_devices

F32_BYTES = 4
COUPLE = 1e-30  # ties each product's input to the last output without changing it visibly


ONE = "one product, W @ x"


def units(d: int, couple: float = COUPLE) -> dict:
    """case -> (matrix shapes of one unit per device, fn(h [D], unit weights) -> h [D]) for width d; each unit
    adds `couple` times (part of) its output to h."""
    import jax
    import jax.numpy as jnp

    def single(form):
        def run(h, ws):
            (w,) = ws
            if form == "x@W":
                y = h @ w
            else:  # rows longer than D (the one-product case) take h repeated
                y = w @ jnp.tile(h, w.shape[1] // h.shape[0])
            return h + couple * y[:1]
        return run

    def independent(h, ws):  # products that do not wait for each other, then one dependent step
        y = h @ ws[0]
        for w in ws[1:]:
            y = y + h @ w
        return h + couple * y[:1]

    def experts(form):
        def run(h, ws):
            g, u, dn = ws
            mul = (lambda v, w: v @ w) if form == "x@W" else (lambda v, w: w @ v)
            return h + couple * mul(jax.nn.silu(mul(h, g)) * mul(h, u), dn)
        return run

    m = d // 4
    return {
        ONE: ([(8 * d, 8 * d)], single("W@x")),  # rows of 8 D; grown to the whole budget by `plan`
        "x @ W [D, D/4]": ([(d, m)], single("x@W")),
        "  in pairs": ([(d, m)] * 2, independent),
        "  in fours": ([(d, m)] * 4, independent),
        "x @ W [D, 4 D]": ([(d, 4 * d)], single("x@W")),
        "experts [in, out]": ([(d, m), (d, m), (m, d)], experts("x@W")),
        "experts [out, in]": ([(m, d), (m, d), (d, m)], experts("W@x")),
        "head x @ W [D, 16 D]": ([(d, 16 * d)], single("x@W")),
    }


def plan(name: str, d: int, budget: int) -> list[tuple[int, int]]:
    """The per-device matrix shapes of a case: its unit repeated to about `budget` bytes; the single product
    grows its rows instead (one matrix of about `budget` bytes, rows of 8 D)."""
    shapes = units(d)[name][0]
    if name == ONE:
        return [(max(1, budget // (F32_BYTES * 8 * d)), 8 * d)]
    unit = sum(r * c for r, c in shapes) * F32_BYTES
    return shapes * max(1, budget // unit)


def chain(fn, n_unit: int):
    """h [1, D] (this device's slice), *weights -> h [1, D]: fn applied unit after unit."""
    def run(h, *ws):
        v = h[0]
        for i in range(0, len(ws), n_unit):
            v = fn(v, [w for w in ws[i:i + n_unit]])
        return v[None]
    return run


def build(name: str, d: int, budget: int, mesh, seed: int = 0, couple: float = COUPLE):
    """(jitted chain, args, weight bytes over all devices) for one case on the mesh's `t` axis."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = mesh.devices.size
    shapes, fn = units(d, couple)[name]
    mats = plan(name, d, budget)
    keys = jax.random.split(jax.random.key(seed), len(mats) + 1)
    spec = NamedSharding(mesh, P("t"))
    ws = [jax.device_put(jax.random.normal(k, (n * r, c), jnp.float32) / c ** 0.5, spec)
          for k, (r, c) in zip(keys[1:], mats)]
    h = jax.device_put(jax.random.normal(keys[0], (n, d), jnp.float32), spec)
    run = jax.jit(jax.shard_map(chain(fn, len(shapes)), mesh=mesh, in_specs=(P("t"),) * (len(ws) + 1),
                                out_specs=P("t")))
    return run, (h, *ws), sum(w.nbytes for w in ws)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=os.cpu_count() or 1, help="host devices (default: one per core)")
    ap.add_argument("--width", type=int, default=1024, help="D, the hidden size (1024: `small`)")
    ap.add_argument("--mib-per-device", type=float, default=96)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    use_host_devices(args.devices)

    import jax
    import numpy as np
    from jax.sharding import Mesh

    from model.bench import MatvecBandwidth

    mesh = Mesh(np.array(jax.devices()[:args.devices]), ("t",))
    budget = int(args.mib_per_device * 2**20)
    meter = MatvecBandwidth()
    cases = {}
    for name in units(args.width):
        run, call_args, nbytes = build(name, args.width, budget, mesh)
        jax.block_until_ready(run(*call_args))  # compile
        cases[name] = (run, call_args, nbytes)
    rates = {name: [] for name in cases}
    shares = {name: [] for name in cases}
    for _ in range(args.rounds):
        bw = meter.sample()
        for name, (run, call_args, nbytes) in cases.items():
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(run(*call_args))
                times.append(time.perf_counter() - t0)
            rates[name].append(nbytes / statistics.median(times))
            shares[name].append(rates[name][-1] / bw)
    bw_med = statistics.median(meter.samples)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"{args.devices} devices, D = {args.width}, about {args.mib_per_device:g} MiB per device per call, "
          f"{args.rounds} rounds; meter median {bw_med / 1e9:.2f} GB/s "
          f"(samples {min(meter.samples) / 1e9:.1f}-{max(meter.samples) / 1e9:.1f})\n")
    print(f"{'case':22} {'GB/s':>7} {'range':>13} {'of meter':>9}")
    rows = []
    for name in cases:
        r = rates[name]
        row = {"case": name, "gb_s": statistics.median(r) / 1e9, "min": min(r) / 1e9, "max": max(r) / 1e9,
               "share_of_meter": statistics.median(shares[name])}
        rows.append(row)
        print(f"{name:22} {row['gb_s']:7.1f} {row['min']:6.1f}-{row['max']:<6.1f} {row['share_of_meter']:9.0%}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": platform.machine(), "cores": os.cpu_count(),
                                               "jax": jax.__version__, "devices": args.devices,
                                               "meter_samples": meter.samples, "rows": rows,
                                               "time": time.strftime("%Y-%m-%d %H:%M")}, indent=2))


if __name__ == "__main__":
    main()
