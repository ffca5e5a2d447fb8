"""Self-speculative decoding with the bundled model's MTP module: acceptance on held-out arithmetic and text
(depth 1 in the decode loop, and the module chained to depth 3, teacher-forced), and greedy decode speed with
and without it at each batch size, side by side in one run, medians over --repeats.

    python scripts/bench_speculative.py --json docs/bench_speculative.json
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

from model import command, generate
from model.cli import BUNDLED_CHECKPOINT, load_any
from model.mtp import chained_acceptance
from model.train.data import problems, stdlib_corpus


def held_out_prompts(tok, n: int) -> dict[str, list[list[int]]]:
    """n held-out arithmetic questions, and n windows of held-out text (200 bytes each, cut at a space)."""
    arith = [tok.encode(p.prompt(), add_bos=True) for p in problems(np.random.default_rng(7), n, heldout=True)]
    held = stdlib_corpus().heldout
    starts = np.linspace(0, len(held) - 400, n).astype(int)
    text = [tok.encode(held[s:s + 200].rsplit(" ", 1)[0] + " ", add_bos=True) for s in starts]
    return {"arithmetic": arith, "text": text}


def main(argv=None):
    ap = command.parser("bench_speculative", __doc__)
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT))
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts per domain")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3, help="chained drafts measured teacher-forced")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if min(args.prompts, args.new_tokens, args.depth, args.repeats, *args.batches) < 1:
        ap.error("--prompts, --new-tokens, --depth, --repeats and --batches must be >= 1")
    params, cfg, tok = load_any(args.checkpoint)
    sets = held_out_prompts(tok, args.prompts)
    acceptance = {}
    for name, prompts in sets.items():
        out = generate(params, cfg, prompts, max_new_tokens=args.new_tokens, speculative=True)
        chains = [chained_acceptance(params, cfg, p + s, len(p), args.depth)
                  for p, s in zip(prompts, out.sequences(include_stop=True)) if len(s) > args.depth + 1]
        acceptance[name] = {"depth1_in_loop": out.acceptance,
                            "tokens_per_step": float(out.num_generated.sum() / out.drafted.sum()),
                            "chained": np.mean(chains, axis=0).tolist()}
    speed = []
    prompts = sets["arithmetic"] + sets["text"]
    for b in args.batches:
        batch = prompts[:b]
        times = {False: [], True: []}
        for spec in times:  # compile both first
            generate(params, cfg, batch, max_new_tokens=args.new_tokens, speculative=spec)
        for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
            for spec in times:
                t0 = time.perf_counter()
                out = generate(params, cfg, batch, max_new_tokens=args.new_tokens, speculative=spec)
                times[spec].append(time.perf_counter() - t0)
                tokens = int(out.num_generated.sum())
                if spec:
                    per_step = tokens / float(out.drafted.sum() + len(batch))  # the prefill emits one each
        plain, spec = statistics.median(times[False]), statistics.median(times[True])
        speed.append({"batch": b, "tok_s_plain": tokens / plain, "tok_s_speculative": tokens / spec,
                      "speedup": plain / spec, "tokens_per_step": per_step,
                      "step_cost_ratio": per_step * spec / plain})
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
    name = "the bundled model" if Path(args.checkpoint) == BUNDLED_CHECKPOINT else args.checkpoint
    print(f"MTP speculative decoding, {name}, greedy, {args.new_tokens} new tokens ({machine})")
    print(f"{'held-out':11} {'accepted (loop)':>15} {'tokens/step':>11} " +
          " ".join(f"{f'chain {d + 1}':>8}" for d in range(args.depth)))
    for name, a in acceptance.items():
        print(f"{name:11} {a['depth1_in_loop']:15.3f} {a['tokens_per_step']:11.2f} " +
              " ".join(f"{x:8.3f}" for x in a["chained"]))
    print(f"\n{'batch':>5} {'tok/s plain':>11} {'tok/s MTP':>9} {'speed-up':>8} {'tokens/step':>11} "
          f"{'step cost':>9}   (median of {args.repeats}; step cost: a verify step over a plain decode step)")
    for r in speed:
        print(f"{r['batch']:5d} {r['tok_s_plain']:11.1f} {r['tok_s_speculative']:9.1f} {r['speedup']:7.2f}x "
              f"{r['tokens_per_step']:11.2f} {r['step_cost_ratio']:8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "new_tokens": args.new_tokens,
                                               "acceptance": acceptance, "speed": speed}, indent=2) + "\n")


if __name__ == "__main__":
    command.run(main)
