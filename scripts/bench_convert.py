"""Converting a release-layout checkpoint of several GB: peak host memory (RSS) and throughput, per --weights,
against the stated bound (model/io/convert.py: the host holds one item at a time).

    python scripts/bench_convert.py                       # writes the source once into --workdir, then converts
    python scripts/bench_convert.py --json docs/bench_convert.json
    python scripts/bench_convert.py --layers 4 --workdir /tmp/r1jax_bench_convert4   # half the layers

The source is random weights in exactly the release's layout (scripts/make_release_fixture.py, written layer by
layer) for a config of R1's head dimensions, scaled down: hidden 2048, 16 heads, 64 experts of width 1024, 8
layers by default (one dense) plus the MTP layer, vocabulary 32768. Each conversion runs in its own process; its
peak RSS is the kernel's (wait4), its rate is source bytes over wall time. The bound column is the resident size
of a process that has imported JAX and orbax, plus `--bound-factor` x the largest item's source bytes.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import command
from model.config import SMALL

BENCH = SMALL.replace(
    vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024, num_hidden_layers=8,
    first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6,
    n_group=8, topk_group=3, num_nextn_predict_layers=1, dtype="bfloat16")

BASELINE = "import jax, orbax.checkpoint, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"


def run(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit status) of a command in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"bench_convert: {' '.join(cmd)} failed: {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024, proc.returncode


def largest_item(src: Path) -> int:
    """Source bytes of the largest item (a layer, or the embedding + head + norm)."""
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    from model.io.safetensors import TensorDirectory

    tensors = TensorDirectory(src)
    per: dict[str, int] = {}
    for name in index:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "globals"
        per[key] = per.get(key, 0) + tensors.nbytes(name)
    return max(per.values())


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None):
    ap = command.parser("bench_convert", __doc__)
    ap.add_argument("--workdir", default="/tmp/r1jax_bench_convert")
    ap.add_argument("--weights", nargs="+", default=["fp8", "r1_fp4"])
    ap.add_argument("--layers", type=int, default=8, help="layers of the source (one dense), MTP aside")
    ap.add_argument("--bound-factor", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--write-source", default=None, help=argparse.SUPPRESS)  # the source, in a process of its own
    args = ap.parse_args(argv)
    if args.write_source:
        from model.io.release import write_random_release

        write_random_release(args.write_source, BENCH.replace(num_hidden_layers=args.layers), seed=0)
        return
    work = Path(args.workdir)
    src = work / "release"
    if not src.exists():
        # in a process of its own: a child starts with its parent's peak RSS on the books, so the parent stays small
        t0 = time.perf_counter()
        run([sys.executable, __file__, "--write-source", str(src), "--layers", str(args.layers)])
        print(f"wrote the source, {du(src) / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    src_bytes = du(src)
    item = largest_item(src)
    base = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True).stdout)
    bound = base + args.bound_factor * item
    rows = []
    for w in args.weights:
        dst = work / f"converted_{w}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.rmtree(work / f"converted_{w}.partial", ignore_errors=True)
        secs, rss, _ = run([sys.executable, str(Path(__file__).resolve().parent / "convert.py"), str(src), str(dst),
                            "--weights", w])
        rows.append({"weights": w, "source_gb": src_bytes / 1e9, "output_gb": du(dst) / 1e9, "seconds": secs,
                     "mb_per_s": src_bytes / secs / 1e6, "peak_rss_gb": rss / 1e9, "bound_gb": bound / 1e9,
                     "within_bound": rss <= bound})
        shutil.rmtree(dst)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"conversion of a {src_bytes / 1e9:.2f} GB release-layout checkpoint, {args.layers} layers + MTP "
          f"({machine}); largest item "
          f"{item / 1e9:.2f} GB, baseline RSS (JAX + orbax imported) {base / 1e9:.2f} GB, bound = baseline + "
          f"{args.bound_factor:g} x largest item = {bound / 1e9:.2f} GB")
    print(f"{'weights':8} {'source GB':>9} {'output GB':>9} {'seconds':>8} {'MB/s':>7} {'peak RSS GB':>11} "
          f"{'bound GB':>8} {'within':>6}")
    for r in rows:
        print(f"{r['weights']:8} {r['source_gb']:9.2f} {r['output_gb']:9.2f} {r['seconds']:8.1f} {r['mb_per_s']:7.1f} "
              f"{r['peak_rss_gb']:11.2f} {r['bound_gb']:8.2f} {'yes' if r['within_bound'] else 'NO':>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "layers": args.layers, "largest_item_gb": item / 1e9,
                                               "baseline_rss_gb": base / 1e9, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    command.run(main)
