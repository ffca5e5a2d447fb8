"""The serving benchmark: a request load through the continuous-batching engine over a sweep of concurrencies (or
arrival rates), reporting time to first token, time per output token, tokens/s per user and in total (medians and
p90), with and without MTP (--mtp), and the curve of tokens/s per user against in total. --hf runs HuggingFace
transformers' `generate` on the same config and weights in the same process, in static batches of each
concurrency, and gives the ratio.

    python scripts/benchmark.py --mtp                               # the bundled model, concurrency 1..16
    python scripts/benchmark.py --preset small --input-len 128 --output-len 64 --concurrency 1 4
    python scripts/benchmark.py --hf --input-len 64 --output-len 64 --json docs/benchmark.json --plot docs/benchmark.png
    python scripts/benchmark.py --input-len 64 --output-len 64 --concurrency 16 --max-len 1024   # a server's cache
    python scripts/benchmark.py --input-len 64 --output-len 64 --concurrency 16 --max-len 1024 --spans 1024
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
import numpy as np

from model import command, init
from model.cli import BUNDLED_CHECKPOINT, load_any
from model.config import get_preset
from model.engine import Engine, check_spans
from model.io.hf_checkpoint import load_hf_checkpoint
from model.load import Load, metrics, run_load


def length_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def hf_total_tok_s(hf, items, concurrency: int) -> float:
    """HF `generate`, greedy, in static batches of `concurrency` (fixed lengths), output tokens / seconds."""
    import torch
    torch.set_num_threads(max(1, os.cpu_count()))
    n_out = items[0][1]
    t0, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for i in range(0, len(items), concurrency):
            ids = torch.tensor([p for p, _ in items[i:i + concurrency]])
            hf.model.generate(ids, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
            tokens += ids.shape[0] * n_out
    return tokens / (time.perf_counter() - t0)


def main(argv=None):
    ap = command.parser("benchmark", __doc__)
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT))
    ap.add_argument("--preset", default=None, help="random weights of a preset instead of the checkpoint")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--input-len", type=length_range, default=(16, 96), help="N or LO:HI (uniform)")
    ap.add_argument("--output-len", type=length_range, default=(32, 64), help="N or LO:HI (uniform)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rate", type=float, default=None, help="requests/s (Poisson) instead of a closed loop; "
                    "--concurrency then sets the engine's slots")
    ap.add_argument("--chunk", type=int, default=64, help="prompt tokens per prefill call")
    ap.add_argument("--max-len", type=int, default=None, help="cache positions per slot, a multiple of --chunk "
                    "(default: the load's longest request, rounded up to it)")
    ap.add_argument("--spans", type=int, nargs="+", default=None, help="the engine's cache read lengths, "
                    "increasing, ending at the cache length (default: the engine's ladder); the cache length alone: "
                    "every call reads all of it")
    ap.add_argument("--decode-steps", type=int, default=1, help="tokens each slot decodes per engine step (one "
                    "call and one read of the results; not with --mtp)")
    ap.add_argument("--mtp", action="store_true", help="each concurrency also with MTP drafts verified every step "
                    "(a checkpoint with an MTP module)")
    ap.add_argument("--hf", action="store_true", help="HF transformers side by side (random weights of the "
                    "config, loaded into both; fixed lengths; needs the reference extra)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="tokens/s per user against in total, PNG (needs matplotlib)")
    args = ap.parse_args(argv)
    try:
        load = Load(args.requests, args.input_len, args.output_len)
    except ValueError as e:
        ap.error(str(e))
    if min(args.concurrency) < 1 or args.chunk < 1 or args.decode_steps < 1 or \
            (args.rate is not None and args.rate <= 0):
        ap.error("--concurrency, --chunk and --decode-steps must be >= 1, --rate > 0")
    if args.mtp and args.decode_steps > 1:
        ap.error("--mtp verifies one draft per step: leave --decode-steps at 1")
    hf = params = None
    if args.hf and (load.input_len[0] != load.input_len[1] or load.output_len[0] != load.output_len[1]):
        ap.error("--hf runs static batches: give fixed --input-len and --output-len")
    if args.hf or args.preset:
        cfg = get_preset(args.preset or "bundled").replace(num_nextn_predict_layers=0)
    else:
        params, cfg, _ = load_any(args.checkpoint)
        name = "the bundled model" if Path(args.checkpoint) == BUNDLED_CHECKPOINT else args.checkpoint
    items = load.items(cfg.vocab_size)
    need = max(len(p) + n for p, n in items)
    max_len = args.max_len or -(-need // args.chunk) * args.chunk
    if max_len < need or max_len % args.chunk:
        ap.error(f"--max-len {max_len} must hold the longest request ({need} positions) and be a multiple of "
                 f"--chunk {args.chunk}")
    try:
        check_spans(args.spans, max_len)
    except ValueError as e:
        ap.error(f"--spans: {e}")
    if args.hf:
        from bench_util import try_hf
        hf = try_hf(cfg, Path(tempfile.mkdtemp()))
        if hf is None:
            ap.exit(2, "benchmark: error: --hf needs torch and transformers (pip install -e '.[reference]')\n")
        params, cfg = load_hf_checkpoint(hf.checkpoint)
        name = f"{args.preset or 'bundled'} config, random weights (the same in both)"
    elif args.preset:
        params, name = init(cfg, jax.random.key(0), std="fan_in"), f"{args.preset}, random weights"
    if args.mtp and (hf is not None or params.mtp is None):
        ap.error("--mtp needs a checkpoint with an MTP module (not --hf or --preset)")
    rows = []
    for c, mtp in ((c, m) for c in args.concurrency for m in ((False, True) if args.mtp else (False,))):
        engine = Engine(params, cfg, slots=c, max_len=max_len, chunk=args.chunk, mtp=mtp,
                        decode_steps=args.decode_steps, spans=args.spans)
        for k in (1 << i for i in range(c.bit_length())):  # compiles the prefill of 1, 2, 4, .. requests at once
            run_load(engine, items[:k], concurrency=k)       # and the decode step
        reqs, secs = run_load(engine, items, concurrency=None if args.rate else c, rate=args.rate)
        row = {"concurrency": c, "mtp": mtp, **metrics(reqs, secs)}
        if mtp:
            row["acceptance"] = sum(r.accepted for r in reqs) / max(1, sum(r.drafted for r in reqs))
        if hf is not None:
            row["hf_total_tok_s"] = hf_total_tok_s(hf, items, c)
            row["ratio_vs_hf"] = row["total_tok_s"] / row["hf_total_tok_s"]
        rows.append(row)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
    load_text = (f"{load.requests} requests, input {load.input_len[0]}-{load.input_len[1]}, output "
                 f"{load.output_len[0]}-{load.output_len[1]}, " + (f"{args.rate} req/s" if args.rate else
                                                                   "closed loop"))
    steps = f", {args.decode_steps} decode steps per call" if args.decode_steps > 1 else ""
    print(f"serving benchmark: {name}; {load_text}; chunk {args.chunk}{steps}, max_len {max_len}, spans "
          f"{'/'.join(map(str, engine.spans))} ({machine})")
    print(f"{'conc':>4} {'MTP':>4} {'TTFT ms p50/p90':>17} {'TPOT ms p50/p90':>16} {'tok/s/user p50/p90':>19} "
          f"{'tok/s total':>11}" + (f" {'HF static':>9} {'ratio':>6}" if hf else ""))
    for r in rows:
        mtp = f"{r['acceptance']:.2f}" if r["mtp"] else "-"
        print(f"{r['concurrency']:4d} {mtp:>4} {r['ttft_ms']['median']:8.1f}/{r['ttft_ms']['p90']:<8.1f} "
              f"{r['tpot_ms']['median']:7.2f}/{r['tpot_ms']['p90']:<8.2f} {r['per_user_tok_s']['median']:9.1f}/"
              f"{r['per_user_tok_s']['p90']:<9.1f} {r['total_tok_s']:11.1f}"
              + (f" {r['hf_total_tok_s']:9.1f} {r['ratio_vs_hf']:5.2f}x" if hf else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "machine": machine, "load": load_text,
                                               "chunk": args.chunk, "decode_steps": args.decode_steps,
                                               "max_len": max_len, "spans": list(engine.spans),
                                               "rows": rows}, indent=2) + "\n")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for mtp in sorted({r["mtp"] for r in rows}):
            sel = [r for r in rows if r["mtp"] == mtp]
            ax.plot([r["per_user_tok_s"]["median"] for r in sel], [r["total_tok_s"] for r in sel], "o-",
                    label="MTP" if mtp else "no MTP")
            for r in sel:
                ax.annotate(f"{r['concurrency']}", (r["per_user_tok_s"]["median"], r["total_tok_s"]))
        ax.legend()
        ax.set(xlabel="tokens/s per user (median)", ylabel="tokens/s in total", title=f"{name} (CPU)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0 if np.isfinite([r["total_tok_s"] for r in rows]).all() else 1


if __name__ == "__main__":
    command.run(main)
