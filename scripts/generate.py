"""Generate from a checkpoint in the HF/DeepSeek layout, streaming nothing yet: prints ids, text and a summary.

    python scripts/generate.py                      # the bundled tiny checkpoint (random weights, see README)
    python scripts/generate.py --checkpoint DIR --prompt "..." --max-new-tokens 64 --temperature 0.6 --top-p 0.95
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import SamplingParams, generate  # noqa: E402
from model.hf_checkpoint import load_hf_checkpoint  # noqa: E402

DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf_tiny"


def byte_encode(text: str, vocab: int) -> list[int]:
    ids = list(text.encode("utf-8"))
    if max(ids, default=0) >= vocab:
        raise SystemExit(f"the byte-level prompt needs a vocabulary of at least 256 ids; this model has {vocab}")
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    ap.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog.")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    params, cfg = load_hf_checkpoint(args.checkpoint)
    prompt = byte_encode(args.prompt, cfg.vocab_size)
    sp = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    t0 = time.perf_counter()
    out = generate(params, cfg, [prompt], max_new_tokens=args.max_new_tokens, sampling=sp,
                   stop_tokens=[cfg.eos_token_id])
    compile_and_run = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(params, cfg, [prompt], max_new_tokens=args.max_new_tokens, sampling=sp,
                   stop_tokens=[cfg.eos_token_id])
    run = time.perf_counter() - t0
    ids = out.sequences()[0]
    print(f"prompt: {args.prompt!r}")
    print(f"new token ids: {ids}")
    print("new text (bytes): " + bytes(i for i in ids if i < 256).decode("utf-8", errors="replace"))
    print(f"prompt tokens {len(prompt)}, new tokens {len(ids)}, first call (with compile) {compile_and_run:.2f} s, "
          f"steady {run * 1e3:.1f} ms = {len(ids) / run:.1f} tokens/s")


if __name__ == "__main__":
    main()
