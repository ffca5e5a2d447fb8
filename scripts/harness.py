"""EleutherAI's lm-evaluation-harness on this model, in one command: any harness task (its own, such as gsm8k or
mmlu, or a directory of task files), on a checkpoint at any precision recipe, on a mesh. Prints the harness's
table; --output writes its results as JSON. Needs lm-eval: pip install -e '.[eval]'.

    python scripts/harness.py --tasks r1jax_arithmetic r1jax_arithmetic_choice r1jax_text \\
        --include-path tests/fixtures/harness                      # the bundled model on local tasks
    python scripts/harness.py --tasks gsm8k --num-fewshot 5 --checkpoint /data/DeepSeek-R1 --recipe r1_fp4 \\
        --mesh expert=8 --batch-size 32                            # the real checkpoint (its tasks download once)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import command
from model.cli import BUNDLED_CHECKPOINT


def main(argv=None):
    ap = command.parser("harness", __doc__)
    ap.add_argument("--tasks", nargs="+", required=True, help="harness task names")
    ap.add_argument("--include-path", default=None, help="a directory of task files (YAML) to add to the harness's")
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT),
                    help="a checkpoint of this project or an HF-layout directory (default: the bundled model)")
    ap.add_argument("--recipe", default="bf16", help="quantization recipe (quant/recipes.py), e.g. r1_fp4, fp8_w8a8")
    ap.add_argument("--mesh", default=None, help="a device mesh, e.g. expert=8 or data=2,expert=4")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    ap.add_argument("--tokenizer", default="auto", help="auto, r1, bytes, or a directory holding tokenizer.json")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per scoring call; generation slots")
    ap.add_argument("--max-length", type=int, default=None,
                    help="tokens one call sees (default: the model's positions, at most 4096)")
    ap.add_argument("--max-gen-toks", type=int, default=256, help="generation limit where a task sets none")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if below 1)")
    ap.add_argument("--bootstrap-iters", type=int, default=1000, help="resamples for the standard errors")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        ap.error("needs EleutherAI's lm-evaluation-harness: pip install -e '.[eval]'")
    from model.harness import lm_class

    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in args.tasks if t not in manager.all_tasks]
    if unknown:
        ap.error(f"unknown task(s) {unknown}" + ("" if args.include_path else " (a local task needs --include-path)"))
    lm = lm_class()(checkpoint=args.checkpoint, recipe=args.recipe, mesh=args.mesh, dtype=args.dtype,
                    tokenizer=args.tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                    max_gen_toks=args.max_gen_toks)
    results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=manager, bootstrap_iters=args.bootstrap_iters, log_samples=False)
    print(make_table(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        keep = {k: results[k] for k in ("results", "versions", "n-shot", "config") if k in results}
        Path(args.output).write_text(json.dumps(keep, indent=2, default=str) + "\n")


if __name__ == "__main__":
    command.run(main)
