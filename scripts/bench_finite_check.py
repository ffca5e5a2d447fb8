"""The cost of generate()'s finite check (one NaN/inf reduction over the logits per step, carried in the decode
loop): tokens/s of `generate` with the check on and off, side by side in one run, medians over --repeats.

    python scripts/bench_finite_check.py --json docs/bench_finite_check.json
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

from model import command, generate, init
from model.config import get_preset


def main(argv=None):
    ap = command.parser("bench_finite_check", __doc__)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for preset in args.presets:
        cfg = get_preset(preset).replace(num_nextn_predict_layers=0)
        params = init(cfg, jax.random.key(0), std="fan_in")
        rng = np.random.default_rng(0)
        for b in args.batches:
            prompts = rng.integers(2, cfg.vocab_size, size=(b, 16)).tolist()
            times = {True: [], False: []}
            for check in (True, False):  # compile both first
                generate(params, cfg, prompts, max_new_tokens=args.new_tokens, check_finite=check)
            for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
                for check in (True, False):
                    t0 = time.perf_counter()
                    generate(params, cfg, prompts, max_new_tokens=args.new_tokens, check_finite=check)
                    times[check].append(time.perf_counter() - t0)
            on, off = statistics.median(times[True]), statistics.median(times[False])
            rows.append({"preset": preset, "batch": b, "vocab": cfg.vocab_size, "tok_s_check": b * args.new_tokens / on,
                         "tok_s_no_check": b * args.new_tokens / off, "cost_pct": 100 * (on / off - 1)})
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
    print(f"generate() with and without the finite check, {args.new_tokens} new tokens, median of {args.repeats} "
          f"({machine})")
    print(f"{'preset':8} {'batch':>5} {'vocab':>6} {'tok/s check':>11} {'tok/s none':>10} {'cost %':>7}")
    for r in rows:
        print(f"{r['preset']:8} {r['batch']:5d} {r['vocab']:6d} {r['tok_s_check']:11.1f} {r['tok_s_no_check']:10.1f} "
              f"{r['cost_pct']:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    command.run(main)
