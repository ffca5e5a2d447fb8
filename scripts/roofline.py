"""The roofline model of serving (model/roofline.py): a batch sweep at one operating point (per-user and total
tokens/s, ideal and calibrated), the prefill time, and every published DeepSeek-R1 figure beside its prediction.

    python scripts/roofline.py                                       # 8x B200, r1_fp4, MTP off, the anchors
    python scripts/roofline.py --hardware H200 --recipe fp8_w8a8 --mtp-depth 1 --acceptance 0.8
    python scripts/roofline.py --json docs/roofline.json --plot docs/roofline.png
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import command
from model import roofline as R
from model.config import get_preset


def main(argv=None):
    ap = command.parser("roofline", __doc__)
    ap.add_argument("--preset", default="r1_671b")
    ap.add_argument("--recipe", default="r1_fp4", help="a recipe of quant/recipes.py: the bytes the planner counts")
    ap.add_argument("--hardware", default="B200", choices=sorted(R.HARDWARE))
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048, help="mean decode context (ISL 1k + OSL 2k / 2)")
    ap.add_argument("--isl", type=int, default=1024, help="prompt length for the prefill time")
    ap.add_argument("--mtp-depth", type=int, default=0)
    ap.add_argument("--acceptance", type=float, nargs="*", default=[],
                    help="conditional acceptance of each draft (one per --mtp-depth; one value repeats)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256, 1024, 3072])
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="per-user against total tokens/s, as a PNG (needs matplotlib)")
    args = ap.parse_args(argv)
    acc = tuple(args.acceptance) * args.mtp_depth if len(args.acceptance) == 1 else tuple(args.acceptance)
    try:
        cfg = get_preset(args.preset)
        mb = R.model_bytes(cfg, args.recipe)
        points = [R.Point(batch=b, context=args.context, devices=args.devices, attention="tp" if b < 64 else "dp",
                          mtp_depth=args.mtp_depth, acceptance=acc) for b in args.batches]
    except ValueError as e:
        ap.error(str(e))
    hw = R.HARDWARE[args.hardware]
    sweep = []
    for pt in points:
        row = {"batch": pt.batch, "attention": pt.attention, "accepted_length": pt.a}
        for name, eff in (("ideal", R.IDEAL), ("calibrated", R.CALIBRATED)):
            s = R.decode_step(cfg, mb, hw, pt, eff)
            row |= {f"{name}_step_ms": s.seconds * 1e3, f"{name}_per_user": s.tokens_per_s_user,
                    f"{name}_total": s.tokens_per_s_total}
        row["weights_gb"], row["kv_gb"] = s.weight_bytes / 1e9, s.kv_bytes / 1e9
        row["held_gb_per_device"] = R.held_per_device(cfg, mb, pt) / 1e9
        row["fits"] = row["held_gb_per_device"] <= hw.hbm_gb
        sweep.append(row)
    print(f"{args.devices}x {hw.name}, {args.recipe}, context {args.context}, MTP depth {args.mtp_depth} "
          f"(accepted length {points[0].a:.2f}); ideal / calibrated (model/roofline.py)")
    print(f"{'batch':>5} {'attn':>4} {'held GB/dev':>11} {'weights GB':>10} {'KV GB':>7} {'step ms':>15} "
          f"{'tok/s/user':>15} {'tok/s total':>19}   (read per step by the node)")
    for r in sweep:
        held = f"{r['held_gb_per_device']:.1f}" + ("" if r["fits"] else " (>HBM)")
        print(f"{r['batch']:5d} {r['attention']:>4} {held:>11} {r['weights_gb']:10.1f} {r['kv_gb']:7.1f} "
              f"{r['ideal_step_ms']:7.2f}/{r['calibrated_step_ms']:<7.2f} {r['ideal_per_user']:7.0f}/"
              f"{r['calibrated_per_user']:<7.0f} {r['ideal_total']:9.0f}/{r['calibrated_total']:<9.0f}")
    prefill = {n: R.prefill_seconds(cfg, mb, hw, args.isl, args.devices, e)
               for n, e in (("ideal", R.IDEAL), ("calibrated", R.CALIBRATED))}
    print(f"prefill of {args.isl} tokens: {prefill['ideal'] * 1e3:.1f} ms ideal, "
          f"{prefill['calibrated'] * 1e3:.1f} ms calibrated")
    anchors = R.compare(cfg)
    print(f"\n{'published figure':64} {'published':>10} {'ideal':>9} {'calibrated':>10} {'error':>6}")
    for a in anchors:
        key = "per_user" if a["published_per_user"] else "total"
        pub = a[f"published_{key}"]
        print(f"{a['source'][:64]:64} {('>' if a['at_least'] else '') + f'{pub:,.1f}':>10} "
              f"{a[f'ideal_{key}']:9,.0f} {a[f'calibrated_{key}']:10,.0f} {a['calibrated_error']:+6.0%}")
    print("GPU per-layer measurements: none in docs/ yet (scripts/gpu_check.py has not run on a GPU)")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hw.name, "recipe": args.recipe, "sweep": sweep,
                                               "prefill_s": prefill, "anchors": anchors}, indent=2) + "\n")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("ideal", "calibrated"):
            ax.plot([r[f"{name}_per_user"] for r in sweep], [r[f"{name}_total"] for r in sweep], "o-", label=name)
        ax.set(xscale="log", yscale="log", xlabel="tokens/s per user", ylabel="tokens/s per node",
               title=f"{args.devices}x {hw.name}, {args.recipe}, MTP depth {args.mtp_depth}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    command.run(main)
