"""Everything the first GPU run should measure, in one command that always leaves its results behind.

    python scripts/gpu_check.py OUT_DIR                 # on a GPU: DeepSeek-V3's sizes, compiled kernels
    python scripts/gpu_check.py OUT_DIR --dry-run       # anywhere: tiny sizes, interpret mode (what CI runs)

Stages, in order, each with its own time budget (seconds, scaled by --budget-scale): env (device, driver, JAX
versions), meters (copy bandwidth, bf16 matmul rate: the roofline every figure is judged against), lower (every
kernel lowered for CUDA at DeepSeek's sizes), correct (every kernel compiled against its plain-jnp reference,
including rows routed only to the last experts of an FP8 stack), kernels (each kernel timed against the XLA
path, as a share of the floor max(bytes / bandwidth, FLOPs / matmul rate), plus a sweep of block sizes), layer
(one DeepSeek-V3 MoE layer with BF16 / FP8 / NVFP4 routed experts: decode at batch 1, 32 and 128 over a 4k
context and the prefill of 4k tokens, xla and pallas backends), model (`small` and the bundled model generating).

A case that fails is recorded with its error and the stage goes on; a stage whose budget runs out records how far
it got; OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md are rewritten after every case, so a run killed from
outside still leaves everything measured before it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from model import command
from pallas_kernels import bench as kb

BUDGETS = {"env": 15, "meters": 30, "lower": 40, "correct": 90, "kernels": 180, "layer": 150, "model": 90}


class Run:
    """The results so far, written out after every case."""

    def __init__(self, out: Path, dry: bool, scale: float):
        self.out, self.dry, self.scale = out, dry, scale
        self.interpret = dry or jax.default_backend() != "gpu"
        self.repeats = 1 if dry else 5
        self.meters = None  # (bytes/s, FLOP/s)
        self.data = {"command": " ".join(sys.argv), "dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "env": {}, "meters": {}, "stages": {}}

    def stage(self, name: str, cases) -> None:
        """Run (case name, thunk) pairs from `cases` (a generator: its setup runs inside the budget) until its
        budget runs out; thunks return a row dict."""
        budget = BUDGETS[name] * self.scale
        rec = self.data["stages"][name] = {"status": "running", "budget_s": budget, "rows": [], "errors": []}
        t0, done = time.perf_counter(), 0
        try:
            for case, thunk in cases:
                if time.perf_counter() - t0 > budget:
                    rec["status"] = "budget"
                    rec["note"] = f"the {budget:.0f} s budget ran out after {done} cases (next: {case})"
                    break
                try:
                    rec["rows"].append({"case": case, **thunk()})
                except Exception as e:  # recorded, and the stage goes on with its next case
                    rec["errors"].append({"case": case, "error": f"{type(e).__name__}: {e}"[:3000]})
                done += 1
                rec["seconds"] = time.perf_counter() - t0
                self.write()
            else:
                rec["status"] = "ok" if not rec["errors"] else "errors"
        except Exception as e:  # the stage's own setup failed: recorded, and the next stage runs
            rec["status"] = "failed"
            rec["errors"].append({"case": "(stage)", "error": f"{type(e).__name__}: {e}"[:3000],
                                  "traceback": traceback.format_exc()[-3000:]})
        rec["seconds"] = time.perf_counter() - t0
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=2, default=str) + "\n"),
                           ("gpu_check.md", markdown(self.data))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / name)


def markdown(data: dict) -> str:
    lines = ["# gpu_check", "", f"`{data['command']}` at {data['started']}", ""]
    lines += [f"- {k}: {v}" for k, v in data["env"].items()] + [""]
    if data["meters"]:
        m = data["meters"]
        lines += [f"Meters: copy {m.get('copy_gb_s', float('nan')):.1f} GB/s, bf16 matmul "
                  f"{m.get('matmul_tflop_s', float('nan')):.1f} TFLOP/s.", ""]
    for name, rec in data["stages"].items():
        lines += [f"## {name}: {rec['status']} ({rec.get('seconds', 0):.1f} s of {rec['budget_s']:.0f})", ""]
        if rec.get("note"):
            lines += [rec["note"], ""]
        rows = rec["rows"]
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
            lines.append("")
        lines += [f"- error in {e['case']}: `{e['error'][:300]}`" for e in rec["errors"]]
        lines.append("")
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


# ---- stages ---------------------------------------------------------------------------------------------------

def env_info() -> dict:
    import jaxlib
    d = jax.devices()[0]
    info = {"backend": jax.default_backend(), "device": d.device_kind, "devices": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
            "sms": getattr(d, "core_count", None), "host_cores": os.cpu_count(),
            "platform_version": getattr(getattr(d, "client", None), "platform_version", None)}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    return info


def meter_cases(run: Run):
    def meters():
        bw = kb.copy_bandwidth(16 << 20 if run.dry else 2 << 30)
        rate = kb.matmul_rate(256 if run.dry else 8192)
        run.meters = (bw, rate)
        run.data["meters"] = {"copy_gb_s": bw / 1e9, "matmul_tflop_s": rate / 1e12}
        return dict(run.data["meters"])
    yield "copy bandwidth and bf16 matmul rate", meters


def lower_cases(run: Run):
    from pallas_kernels import arg_specs
    from pallas_kernels.common import lower_for_cuda
    from pallas_kernels.grouped_matmul import grouped_matmul
    from pallas_kernels.mla_decode import mla_decode
    from pallas_kernels.mla_prefill import mla_prefill

    def lowered(fn, *args):
        def thunk():
            text = lower_for_cuda(fn, *args).as_text()
            return {"triton_calls": text.lower().count("triton"), "jax": jax.__version__}
        return thunk
    x, gs = arg_specs.expert_rows(64)
    for fmt in ("bf16", "fp8", "nvfp4", "mxfp4"):
        w = arg_specs.expert_weights(fmt)
        yield f"grouped_matmul swiglu {fmt}", lowered(lambda x, a, g: grouped_matmul(x, a, g, a, interpret=False),
                                                      x, w, gs)
    yield "mla_decode bf16", lowered(lambda *a: mla_decode(*a, sm_scale=0.1, interpret=False), *arg_specs.decode())
    yield "mla_decode fp8 cache", lowered(lambda *a: mla_decode(*a[:-1], sm_scale=0.1, kv_scale=a[-1],
                                                                interpret=False), *arg_specs.decode(fp8=True))
    yield "mla_prefill", lowered(lambda *a: mla_prefill(*a, sm_scale=0.1, interpret=False), *arg_specs.prefill())


def correct_cases(run: Run):
    sz, it = kb.sizes(run.dry), run.interpret
    for fmt in ("bf16", "fp8", "nvfp4", "mxfp4"):
        yield f"grouped_matmul {fmt}", lambda fmt=fmt: _checked(kb.grouped_matmul_rows(
            sz, fmt, sz["gmm_tokens"][0], None, it, time=False, reference=True))
    for fmt in ("fp8", "bf16"):  # rows only for the last experts: offsets near the end of one layer's stack
        yield f"grouped_matmul {fmt}, last experts", lambda fmt=fmt: _checked(kb.grouped_matmul_rows(
            sz, fmt, sz["gmm_tokens"][0], None, it, last=True, time=False, reference=True))
    b, _, s = sz["decode"][0]
    for heads in sorted({sz["heads"], 16}):
        for fp8 in (False, True):
            yield f"mla_decode heads {heads} {'fp8' if fp8 else 'bf16'}", lambda h=heads, f=fp8: _checked(
                kb.mla_decode_rows(sz, b, h, s, None, it, fp8=f, time=False))
    pb, pt, pn = sz["prefill"]
    yield "mla_prefill", lambda: _checked(kb.mla_prefill_rows(sz, pb, min(pt, 2048), pn, None, it, time=False))


def _checked(row: dict, tol: float = 2e-2) -> dict:
    """The interpret tests' bf16 tolerance, relative to the output's scale."""
    err = row.get("rel_err_vs_reference", row.get("rel_err_vs_xla"))
    row["within_tolerance"] = bool(err <= tol)
    return row


def kernel_cases(run: Run):
    from pallas_kernels.grouped_matmul import BlockSizes as G
    from pallas_kernels.mla_decode import BlockSizes as D
    from pallas_kernels.mla_prefill import BlockSizes as P

    sz, it, m, r = kb.sizes(run.dry), run.interpret, run.meters, run.repeats
    if m is None:
        raise RuntimeError("the meters stage did not run: no roofline to compare with")
    for tokens in sz["gmm_tokens"]:
        for fmt in ("bf16", "nvfp4", "fp8", "mxfp4"):
            yield f"grouped_matmul {fmt} {tokens} tokens", lambda f=fmt, t=tokens: kb.grouped_matmul_rows(
                sz, f, t, m, it, repeats=r)
    for b, n, s in sz["decode"]:
        for fp8 in (False, True):
            yield f"mla_decode {b}x{n}x{s} {'fp8' if fp8 else 'bf16'}", lambda b=b, n=n, s=s, f=fp8: (
                kb.mla_decode_rows(sz, b, n, s, m, it, fp8=f, repeats=r))
    pb, pt, pn = sz["prefill"]
    yield f"mla_prefill {pt}", lambda: kb.mla_prefill_rows(sz, pb, pt, pn, m, it, repeats=r)
    # block-size sweeps: what the defaults should become, from the GPU itself (candidates that fit the shapes)
    tokens = sz["gmm_tokens"][-2 if len(sz["gmm_tokens"]) > 1 else 0]
    first = (lambda xs: xs[:1]) if run.dry else (lambda xs: xs)
    for fmt in first(("bf16", "nvfp4")):
        for bs in first([bs for bs in (G(16, 128, 128), G(16, 64, 256), G(16, 128, 64, 4, 4), G(16, 64, 128, 8, 3),
                                       G(32, 64, 128)) if sz["width"] % bs.bn == 0 and sz["hidden"] % bs.bk == 0]):
            yield f"sweep grouped_matmul {fmt} {bs}", lambda f=fmt, bs=bs: kb.grouped_matmul_rows(
                sz, f, tokens, m, it, block_sizes=bs, repeats=r)
    b, _, s = sz["decode"][0]
    for n in first(sorted({sz["heads"], 16})):
        for bs in first([bs for bs in (D(16, 32, 8, 4), D(16, 64, 4, 4), D(16, 64, 16, 4), D(32, 32, 4, 4),
                                       D(64, 16, 4, 8), D(64, 32, 1, 8), D(64, 32, 8, 8), D(16, 128, 8, 4, 1))
                         if n % bs.bh == 0 and (s // bs.bt) % bs.splits == 0]):
            yield f"sweep mla_decode heads {n} {bs}", lambda n=n, bs=bs: kb.mla_decode_rows(
                sz, b, n, s, m, it, block_sizes=bs, repeats=r)
    for bs in first([bs for bs in (P(64, 64, 4, 2), P(128, 32, 8, 3), P(128, 128, 8, 2), P(64, 128, 4, 3),
                                   P(32, 32, 4, 2)) if pt % bs.bq == 0 and pt % bs.bk == 0]):
        yield f"sweep mla_prefill {bs}", lambda bs=bs: kb.mla_prefill_rows(sz, pb, pt, pn, m, it, block_sizes=bs,
                                                                           repeats=r)


def layer_cases(run: Run):
    from gpu_layer import layer_rows
    yield from layer_rows(run.dry, run.meters, run.repeats)


def model_cases(run: Run):
    from gpu_layer import model_rows
    yield from model_rows(run.dry)


STAGES = {"env": None, "meters": meter_cases, "lower": lower_cases, "correct": correct_cases,
          "kernels": kernel_cases, "layer": layer_cases, "model": model_cases}


def main(argv=None) -> int:
    ap = command.parser("gpu_check", __doc__)
    ap.add_argument("out", type=Path, help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, interpret mode: proves the script anywhere")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage's time budget")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    if args.budget_scale <= 0:
        ap.error(f"--budget-scale must be positive, got {args.budget_scale}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run = Run(args.out, args.dry_run, args.budget_scale)
    run.data["env"] = env_info()
    print(" ".join(f"{k}={v}" for k, v in run.data["env"].items()), flush=True)
    for name in stages:
        if STAGES[name] is not None:
            run.stage(name, STAGES[name](run))
            rec = run.data["stages"][name]
            print(f"{name}: {rec['status']}, {len(rec['rows'])} rows, {len(rec['errors'])} errors, "
                  f"{rec['seconds']:.1f} s", flush=True)
    run.write()
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    command.run(main)
