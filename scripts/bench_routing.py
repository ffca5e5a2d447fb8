"""The cost of collecting routing statistics: the decode step of the bundled model (or a preset) with routing off
(the default) and on, and the same step when its routing is also counted (routing_stats), side by side in one run,
medians over --repeats of --steps steps each.

    python scripts/bench_routing.py --json docs/bench_routing.json

The default step's program is the one it was before routing statistics existed (routing=False traces no extra
output); the "off" column is that program.
"""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from model import command, init, init_cache, prefill, routing_stats
from model.cli import BUNDLED_CHECKPOINT, load_any
from model.config import get_preset
from model.forward import _decode
from model.plan import ExecutionPlan


def _steps(params, cfg, cache, tok, steps, mode):
    t0 = time.perf_counter()
    for _ in range(steps):
        out = _decode(params, cache, tok, cfg=cfg, plan=ExecutionPlan(), routing=mode != "off")
        cache = out[1]
        if mode == "counted":
            out = (*out[:2], routing_stats(out[2], cfg))
    jax.block_until_ready(out)
    return time.perf_counter() - t0, cache


def main(argv=None):
    ap = command.parser("bench_routing", __doc__)
    ap.add_argument("--model", default="bundled", help="bundled, or a preset name (random weights)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.model == "bundled":
        params, cfg, _ = load_any(BUNDLED_CHECKPOINT)
    else:
        cfg = get_preset(args.model)
        params = init(cfg, jax.random.key(0), std="fan_in")
    modes = ("off", "on", "counted")
    rows = []
    for b in args.batches:
        rng = np.random.default_rng(0)
        prompt = rng.integers(2, 256, size=(b, 16))
        caches = {}
        for m in modes:  # one cache per mode, each long enough for every repeat
            _, caches[m] = prefill(params, init_cache(cfg, b, 16 + (args.repeats + 1) * args.steps), prompt,
                                   np.full(b, 16), cfg=cfg)
        tok = jax.numpy.asarray(prompt[:, -1], jax.numpy.int32)
        times = {m: [] for m in modes}
        for m in modes:  # compile
            _, caches[m] = _steps(params, cfg, caches[m], tok, args.steps, m)
        for _ in range(args.repeats):  # interleaved, so drifts of the machine hit every mode alike
            for m in modes:
                s, caches[m] = _steps(params, cfg, caches[m], tok, args.steps, m)
                times[m].append(s / args.steps)
        med = {m: statistics.median(v) for m, v in times.items()}
        rows.append({"batch": b, **{f"ms_{m}": 1e3 * med[m] for m in modes},
                     **{f"ratio_{m}": med[m] / med["off"] for m in modes[1:]}})
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
    print(f"decode step of {args.model}, routing off / on / on and counted, median of {args.repeats} x "
          f"{args.steps} steps ({machine})")
    print(f"{'batch':>5} {'ms off':>8} {'ms on':>8} {'ms counted':>10} {'on/off':>7} {'counted/off':>11}")
    for r in rows:
        print(f"{r['batch']:5d} {r['ms_off']:8.3f} {r['ms_on']:8.3f} {r['ms_counted']:10.3f} {r['ratio_on']:7.3f} "
              f"{r['ratio_counted']:11.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "model": args.model, "rows": rows}, indent=2)
                                   + "\n")


if __name__ == "__main__":
    command.run(main)
