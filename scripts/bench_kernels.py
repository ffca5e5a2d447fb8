"""Pallas kernels against the XLA path, side by side in one run: time (median), achieved bytes/s and FLOP/s, and
the roofline floor max(bytes / bandwidth, FLOPs / peak) for each case. A table, and JSON with --json.

On a GPU: DeepSeek-V3's shapes for one layer (256 experts, hidden 7168, expert width 2048, top-8; 128 heads,
latent 512 + 64; contexts 1k-32k; decode batches 1-128), the roofline from the device's published peaks (H100
SXM: 3.35 TB/s, 989 TFLOP/s bf16). Elsewhere the kernels run in interpret mode at reduced sizes (printed), the
roofline from this machine's measured copy bandwidth and matmul rate: the CPU numbers check that the script works,
they say nothing about the kernels' speed.

    python scripts/bench_kernels.py --json docs/bench_kernels.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from model.bench import median_time
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.mla_decode import mla_decode, mla_decode_reference
from quant.qarray import quantize

PEAKS = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12), "B200": (8e12, 2250e12)}


def time_call(fn, *args, repeats: int = 5) -> float:
    return median_time(lambda: jax.block_until_ready(fn(*args)), repeats)


def machine_peaks():
    kind = jax.devices()[0].device_kind
    for name, peaks in PEAKS.items():
        if name in kind:
            return kind, peaks, "published"
    x = jnp.ones((64 * 1024 * 1024 // 4,), jnp.float32)
    t = time_call(jax.jit(lambda a: a * 1.0001), x)
    bw = 2 * x.nbytes / t
    a = jnp.ones((1024, 1024), jnp.float32)
    flops = 2 * 1024 ** 3 / time_call(jax.jit(lambda a: a @ a), a)
    return kind, (bw, flops), "measured"


def row(name, shape, bytes_, flops, t_kernel, t_xla, peaks):
    bw, peak = peaks
    floor = max(bytes_ / bw, flops / peak)
    return {"kernel": name, "shape": shape, "bytes": bytes_, "flops": flops, "pallas_s": t_kernel, "xla_s": t_xla,
            "pallas_bytes_per_s": bytes_ / t_kernel, "pallas_flops_per_s": flops / t_kernel,
            "roofline_floor_s": floor, "pallas_frac_of_roofline": floor / t_kernel, "xla_over_pallas": t_xla / t_kernel}


def bench_grouped(gpu: bool, peaks, dtype):
    e, d, m, topk = (256, 7168, 2048, 8) if gpu else (16, 256, 128, 4)
    batches = (1, 8, 32, 64) if gpu else (1, 8)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((e, d, m)) * 0.02, dtype)
    wq = quantize(w, "nvfp4", k_axis=-2, batch_ndim=1)
    interp = not gpu
    out = []
    for b in batches:
        rows = b * topk
        ids = np.sort(rng.choice(e, size=rows, replace=rows > e))
        sizes = jnp.asarray(np.bincount(ids, minlength=e), jnp.int32)
        used = int((np.asarray(sizes) > 0).sum())
        x = jnp.asarray(rng.standard_normal((rows, d)), dtype)
        bm = 16 if rows <= 128 else 64
        bn, bk = (128, 64) if gpu else (64, 64)
        gm = jax.jit(lambda x, w, s, bm=bm, bn=bn, bk=bk: grouped_matmul(x, w, s, bm=bm, bn=bn, bk=bk, interpret=interp))
        rd = jax.jit(lambda x, w, s: jax.lax.ragged_dot(x, w, s, preferred_element_type=jnp.float32))
        t_rd = time_call(rd, x, w, sizes)
        flops = 2 * rows * d * m
        act = rows * d * 2 + rows * m * 2
        t_bf = time_call(gm, x, w, sizes)
        out.append(row(f"grouped_matmul {jnp.dtype(dtype).name}", f"tokens {b} x top{topk}, E{e} D{d} M{m}", used * d * m * 2 + act,
                       flops, t_bf, t_rd, peaks))
        t_q = time_call(gm, x, wq, sizes)
        packed = used * (d * m // 2 + d * m // 16) + act  # codes + E4M3 scales, counted as stored
        out.append(row("grouped_matmul nvfp4", f"tokens {b} x top{topk}, E{e} D{d} M{m}", packed, flops, t_q, t_rd,
                       peaks))
    return out


def bench_mla(gpu: bool, peaks, dtype):
    n, c, r = (128, 512, 64) if gpu else (16, 128, 64)
    cases = [(b, s) for b in (1, 32, 128) for s in (1024, 4096, 32768)] if gpu else [(2, 256), (4, 1024)]
    rng = np.random.default_rng(1)
    out = []
    for b, s in cases:
        if gpu and b * s * (c + r) * 2 > 20e9:
            continue
        q = jnp.asarray(rng.standard_normal((b, n, c)), dtype)
        qp = jnp.asarray(rng.standard_normal((b, n, r)), dtype)
        ck = jnp.asarray(rng.standard_normal((b, s, c)), dtype)
        kr = jnp.asarray(rng.standard_normal((b, s, r)), dtype)
        lens = jnp.full((b,), s, jnp.int32)
        splits = max(1, min(8, (s // 64) // 4))
        ker = jax.jit(lambda *a, splits=splits: mla_decode(*a, sm_scale=0.1, bh=16, bt=64, splits=splits,
                                            interpret=not gpu))
        ref = jax.jit(lambda *a: mla_decode_reference(*a, sm_scale=0.1))
        bytes_ = b * s * (c + r) * 2 + b * n * (c + r) * 2 + b * n * c * 4
        flops = 2 * b * n * s * (c + r) + 2 * b * n * s * c
        out.append(row(f"mla_decode {jnp.dtype(dtype).name}", f"batch {b}, context {s}, heads {n}, latent {c}+{r}", bytes_, flops,
                       time_call(ker, q, qp, ck, kr, lens), time_call(ref, q, qp, ck, kr, lens), peaks))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    kind, peaks, source = machine_peaks()
    print(f"device {kind} ({jax.default_backend()}), jax {jax.__version__}; roofline from {source} peaks "
          f"{peaks[0] / 1e9:.1f} GB/s, {peaks[1] / 1e12:.2f} TFLOP/s")
    if not gpu:
        print("no GPU: kernels in interpret mode at REDUCED sizes, float32 (timings check the script, not speed)")
    rows = bench_grouped(gpu, peaks, dtype) + bench_mla(gpu, peaks, dtype)
    hdr = (f"{'kernel':22} {'shape':44} {'pallas ms':>10} {'xla ms':>9} {'GB/s':>9} {'TFLOP/s':>8} "
           f"{'floor ms':>9} {'%roof':>6} {'xla/pallas':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['kernel']:22} {r['shape']:44} {r['pallas_s'] * 1e3:10.3f} {r['xla_s'] * 1e3:9.3f} "
              f"{r['pallas_bytes_per_s'] / 1e9:9.1f} {r['pallas_flops_per_s'] / 1e12:8.3f} "
              f"{r['roofline_floor_s'] * 1e3:9.3f} {r['pallas_frac_of_roofline']:6.1%} {r['xla_over_pallas']:10.2f}")
    print("xla column: lax.ragged_dot on the unquantized weights (grouped_matmul rows), the plain-jnp attention "
          "(mla_decode rows)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": kind, "backend": jax.default_backend(),
                                               "jax": jax.__version__, "peaks": peaks, "peaks_source": source,
                                               "reduced_sizes": not gpu, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
