"""Decode and prefill throughput on CPU for the `tiny` and `small` presets, with HF transformers on the same
config and weights side by side in the same run when the `reference` extra is installed.

Prints a table and optionally writes JSON:
    python scripts/bench_decode.py --presets tiny small --json results/bench_decode.json

Reported per preset: decode tokens/s at batch 1 and 8 (decode loop on the device, prompt of 32 tokens), prefill
tokens/s at 128 and 512 prompt tokens, the bytes of weights one decode step must read (attention, dense MLP,
router, shared expert and the *distinct* selected experts, LM head) and the achieved bytes/s against this
machine's matrix-vector read bandwidth, measured in the same run. Medians over --repeats runs after a warm-up.

By default the run holds Linux's wake-up latency request at 0 us (/dev/cpu_dma_latency, bench_util.idle_polling),
so idle cores poll instead of halting while it runs: on a virtual machine a halted core takes tens of
microseconds to wake, which every hand-over between XLA:CPU's threads pays. The request ends with the run.
`--idle default` leaves the machine's setting; the header says which one the run had.
"""

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
from bench_util import MatvecBandwidth, bench_ours, decode_bytes_per_step, idle_polling, try_hf

from model import command
from model.config import get_preset


def main(argv=None):
    ap = command.parser("bench_decode", __doc__)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prefill-lengths", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--idle", choices=("poll", "default"), default="poll",
                    help="poll: hold the wake-up latency request at 0 us for the run, so idle cores poll instead "
                         "of halting (needs write access to /dev/cpu_dma_latency, else the run says so and goes "
                         "on with the default); default: leave the machine's setting")
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers even if installed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.idle == "poll":
        with idle_polling() as idle:
            run(args, idle.detail)
    else:
        run(args, "default (--idle default)")


def run(args, idle: str):
    meter = MatvecBandwidth()
    bw0 = meter.sample(10)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"matrix-vector read bandwidth {bw0 / 1e9:.2f} GB/s at the start (f32 256 MiB matrix, median of 10); "
          f"each decode row is compared with the median of samples taken between its own timed runs; "
          f"idle cores: {idle}")
    rows = []
    for name in args.presets:
        cfg = get_preset(name)
        with tempfile.TemporaryDirectory() as tmp:
            hf = None if args.no_hf else try_hf(cfg, Path(tmp))
            ours = bench_ours(cfg, hf.checkpoint if hf else None, args, bandwidth=meter)
            theirs = hf.bench(args) if hf else {}
        for key, tps in ours.items():
            kind, n = key
            if kind.startswith("bw"):
                continue
            row = {"preset": name, "kind": kind, "size": n, "ours_tok_s": tps,
                   "hf_tok_s": theirs.get((kind.split("/")[0], n))}
            if kind.startswith("decode"):
                nbytes, bw = decode_bytes_per_step(cfg, n), ours[(kind.replace("decode", "bw"), n)]
                row.update(bytes_per_step=nbytes, achieved_gb_s=nbytes * tps / n / 1e9, bw_gb_s=bw / 1e9,
                           frac_of_bw=nbytes * tps / n / bw)
            rows.append(row)
    print(f"\n{'preset':7} {'what':9} {'B/T':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6} "
          f"{'MB/step':>8} {'GB/s':>6} {'bw GB/s':>8} {'of bw':>6}")
    for r in rows:
        hf_s = f"{r['hf_tok_s']:9.1f}" if r["hf_tok_s"] else f"{'-':>9}"
        ratio = f"{r['ours_tok_s'] / r['hf_tok_s']:6.2f}" if r["hf_tok_s"] else f"{'-':>6}"
        extra = (f"{r['bytes_per_step'] / 1e6:8.1f} {r['achieved_gb_s']:6.2f} {r['bw_gb_s']:8.2f} "
                 f"{r['frac_of_bw']:6.0%}"
                 if r["kind"].startswith("decode") else "")
        print(f"{r['preset']:7} {r['kind']:9} {r['size']:5d} {r['ours_tok_s']:11.1f} {hf_s} {ratio} {extra}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": platform.machine(), "cores": os.cpu_count(),
                                               "jax": jax.__version__, "idle": idle, "matvec_bw_start": bw0,
                                               "matvec_bw_samples": meter.samples, "rows": rows,
                                               "time": time.strftime("%Y-%m-%d %H:%M")}, indent=2))


if __name__ == "__main__":
    command.run(main)
