"""The FP8-vs-FP4 table on the bundled trained model: one row per precision (BF16, FP8 W8A8, NVFP4 W4A16, NVFP4
W4A4, MXFP4 W4A4, NVFP4 with scale search, the published R1-FP4 recipe, MXFP4 W4A16), columns: held-out bits per
byte, arithmetic exact match, greedy-token agreement and mean KL to BF16, weight bytes.

    python scripts/eval_quant.py --json docs/eval_quant.json --plot docs/eval_quant.png
    python scripts/eval_quant.py --rows bf16,r1_fp4,nvfp4_w4a4+attn --problems 50
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import command
from model.cli import BUNDLED_CHECKPOINT, load_any
from model.train.quant_eval import DEFAULT_ROWS, HEADER, eval_quant, format_table, plot
from quant.recipes import get_recipe


def main(argv=None):
    ap = command.parser("eval_quant", __doc__)
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT))
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated recipes; the first is the "
                    "reference for agreement and KL")
    ap.add_argument("--problems", type=int, default=100, help="held-out problems per kind")
    ap.add_argument("--text-bytes", type=int, default=30000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write a PNG (needs matplotlib: pip install -e '.[plot]')")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        get_recipe(r)  # unknown names fail here, before loading anything
    params, cfg, tok = load_any(args.checkpoint)
    print(HEADER)
    print("-" * len(HEADER))
    res = eval_quant(params, cfg, tok, rows=rows, n_problems=args.problems, text_bytes=args.text_bytes)
    res["checkpoint"] = args.checkpoint
    print()
    print(format_table(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, default=float) + "\n")
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    command.run(main)
