"""Grouped matmul for the routed experts, in Pallas (Triton backend on GPU, interpret mode on CPU).

Rows x [M, K] are sorted by expert: rows [start_g, end_g) use expert g. Work items are row tiles aligned to each
group's first row (group g of s_g rows owns ceil(s_g / bm) items, an empty group none), so every output row is
written by exactly one item and no two programs touch the same row. The item -> (group, first row) map is
computed up front in jnp and passed as ordinary int32 inputs (Triton has no scalar prefetch); items past the last
one exit at once. Each program loops over K in bk chunks, accumulates in float32 and stores its rows under a
mask. Grid: (items, N / bn).

Weights:
- plain: [G, K, N] (our [E, D, M] expert stacks), any float dtype;
- quantized: a quant.QArray stack (codes [G, N, K/2] uint8 for NVFP4/MXFP4, [G, N, K] float8 for FP8, K last),
  dequantized inside the kernel, tile by tile, in registers: never written out. NVFP4's per-expert float32 tensor
  scale multiplies the accumulator after the dot (so the in-tile products stay exact); FP8's 128x128 scales
  multiply each 128-deep partial product.
`grouped_matmul_reference` is the plain-jnp twin (dequantize, then one dot per group).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from quant.qarray import dequantize, is_qarray

F32 = jnp.float32


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def tile_map(group_sizes: jax.Array, m: int, bm: int):
    """(item_group [I], item_row0 [I], item_end [I], n_items) for I = cdiv(m, bm) + G items (the bound)."""
    g = group_sizes.shape[0]
    n_max = -(-m // bm) + g
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    n_items = -(-group_sizes // bm)
    item_end = jnp.cumsum(n_items)
    item_start = item_end - n_items
    j = jnp.arange(n_max)
    e = jnp.minimum(jnp.searchsorted(item_end, j, side="right"), g - 1).astype(jnp.int32)
    row0 = (starts[e] + (j - item_start[e]) * bm).astype(jnp.int32)
    valid = j < item_end[-1]
    return (jnp.where(valid, e, 0), jnp.where(valid, row0, 0), jnp.where(valid, ends[e], 0).astype(jnp.int32),
            item_end[-1].astype(jnp.int32))


def _e2m1(codes):
    """E2M1 codes (int32, 0..15) -> float32, by the bit fields: exponent 0 is the subnormal 0.5 * m."""
    e, m = (codes >> 1) & 3, codes & 1
    mag = jnp.where(e == 0, 0.5 * m.astype(F32), (1.0 + 0.5 * m.astype(F32)) * jnp.exp2((e - 1).astype(F32)))
    return jnp.where(codes >= 8, -mag, mag)


def _weight_tile(kind, refs, e, k0, n0, bk, bn, dtype):
    """The [bn, bk] weight tile of expert e (K-major) in `dtype`, dequantized here when quantized."""
    if kind == "plain":
        (w_ref,) = refs
        return w_ref[e, pl.ds(k0, bk), pl.ds(n0, bn)].astype(dtype).T
    if kind == "fp8":
        codes_ref, _ = refs
        return codes_ref[e, pl.ds(n0, bn), pl.ds(k0, bk)].astype(dtype)
    codes_ref, scales_ref = refs[0], refs[1]
    packed = codes_ref[e, pl.ds(n0, bn), pl.ds(k0 // 2, bk // 2)].astype(jnp.int32)  # [bn, bk/2]
    codes = jnp.stack([packed & 15, packed >> 4], axis=-1).reshape(bn, bk)  # low nibble = even element
    block = 16 if kind == "nvfp4" else 32
    sc = scales_ref[e, pl.ds(n0, bn), pl.ds(k0 // block, bk // block)]
    if kind == "nvfp4":
        s = sc.astype(F32)
    else:  # E8M0 byte b -> 2^(b - 127), assembled from the bits (b >= 1; 0xFF is NaN)
        b = sc.astype(jnp.int32)
        s = jnp.where(b == 255, jnp.nan, jax.lax.bitcast_convert_type(jnp.maximum(b, 1) << 23, F32))
    w = _e2m1(codes).reshape(bn, bk // block, block) * s[..., None]
    return w.reshape(bn, bk).astype(dtype)


def _kernel(group_ref, row0_ref, end_ref, count_ref, x_ref, *rest, kind, n_w, bm, bn, bk, k, swiglu):
    """count_ref holds (number of items, expert offset): group g reads weights [offset + g]."""
    o_ref = rest[-1]
    w_sets = [rest[i * n_w:(i + 1) * n_w] for i in range(2 if swiglu else 1)]
    tscale = rest[(2 if swiglu else 1) * n_w:-1]
    j, jn = pl.program_id(0), pl.program_id(1)

    @pl.when(j < count_ref[0])
    def _():
        e, r0, end = group_ref[j] + count_ref[1], row0_ref[j], end_ref[j]
        n0 = pl.multiple_of(jn * bn, bn)
        dt = x_ref.dtype

        def body(kk, accs):
            k0 = pl.multiple_of(kk * bk, bk)
            xt = x_ref[pl.ds(r0, bm), pl.ds(k0, bk)]  # [bm, bk]
            out = []
            for acc, refs in zip(accs, w_sets):
                wt = _weight_tile(kind, refs, e, k0, n0, bk, bn, dt)  # [bn, bk]
                part = jax.lax.dot_general(xt, wt, (((1,), (1,)), ((), ())), preferred_element_type=F32)
                if kind == "fp8":  # one float32 scale per 128 x 128 tile: promote each 128-deep partial product
                    part = part * refs[1][e, n0 // 128, k0 // 128]
                out.append(acc + part)
            return tuple(out)

        accs = jax.lax.fori_loop(0, k // bk, body, tuple(jnp.zeros((bm, bn), F32) for _ in w_sets))
        if tscale:  # NVFP4: the per-expert float32 tensor scale, once, on the accumulator
            accs = tuple(a * t[e] for a, t in zip(accs, tscale))
        y = jax.nn.silu(accs[0]) * accs[1] if swiglu else accs[0]
        rows = r0 + jnp.arange(bm)
        # the tile's rows past its group's end belong to the next group's items: a masked store leaves them alone
        # (a read-modify-write would race with the program that owns them)
        plt.store(o_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], y.astype(o_ref.dtype), mask=(rows < end)[:, None])


def _operands(w):
    """(kind, weight arrays, tensor scale or None, K, N)."""
    if not is_qarray(w):
        _, k, n = w.shape
        return "plain", (w,), None, k, n
    if w.batch_ndim != 1 or w.n_out != 1:
        raise ValueError(f"grouped_matmul takes a [G, K, N] stack; got a quantized weight of shape {w.shape} with "
                         f"{w.batch_ndim} batch axes")
    _, n, kp = w.codes.shape
    k = kp * (2 if w.fmt != "fp8" else 1)
    return w.fmt, (w.codes, w.scales), (w.tensor_scale if w.fmt == "nvfp4" else None), k, n


def check_shapes(kind: str, m: int, k: int, n: int, bm: int, bn: int, bk: int) -> None:
    """Clear errors for what the kernel does not support (before any tracing or lowering)."""
    for name, v in (("bm", bm), ("bn", bn), ("bk", bk)):
        if not _pow2(v) or v < 16:
            raise ValueError(f"grouped_matmul: {name}={v} must be a power of two >= 16 (Triton tiles)")
    if k % bk:
        raise ValueError(f"grouped_matmul: K={k} must be a multiple of bk={bk}")
    if n % bn:
        raise ValueError(f"grouped_matmul: N={n} must be a multiple of bn={bn}")
    if kind == "mxfp4" and bk % 32 or kind == "nvfp4" and bk % 16:
        raise ValueError(f"grouped_matmul: bk={bk} must hold whole {kind} scale blocks")
    if kind == "fp8" and (bk != 128 or bn != 128):
        raise ValueError(f"grouped_matmul: FP8 weights need bk = bn = 128 (one 128x128 scale tile per step), "
                         f"got bk={bk}, bn={bn}")


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "interpret", "num_warps", "num_stages"))
def grouped_matmul(x, w, group_sizes, w_up=None, expert_offset=0, *, bm: int = 64, bn: int = 64, bk: int = 64,
                   interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
    """y[r] = x[r] @ W[g(r)] for rows sorted by group; with w_up: silu(x W) * (x W_up) (fused gate/up SwiGLU).

    x: [M, K]; w, w_up: [G', K, N] arrays or quant.QArray stacks, group g using matrix expert_offset + g (a
    layer's experts inside a whole [L*E, ...] stack, unsliced); group_sizes: [G] int32 summing to <= M (rows past
    the sum come back as zeros). Returns [M, N] in x's dtype.
    """
    m = x.shape[0]
    kind, w_arrays, tscale, k, n = _operands(w)
    check_shapes(kind, m, k, n, bm, bn, bk)
    if x.shape[1] != k:
        raise ValueError(f"grouped_matmul: x has K={x.shape[1]}, the weights K={k}")
    sets = [w_arrays]
    scales = [tscale] if tscale is not None else []
    if w_up is not None:
        kind2, up_arrays, tscale2, k2, n2 = _operands(w_up)
        if (kind2, k2, n2) != (kind, k, n):
            raise ValueError("grouped_matmul: gate and up weights must share format and shape")
        sets.append(up_arrays)
        scales += [tscale2] if tscale2 is not None else []
    group, row0, end, count = tile_map(group_sizes.astype(jnp.int32), m, bm)
    x_pad = jnp.pad(x, ((0, bm), (0, 0)))  # a tile starting at any row stays in bounds
    whole = pl.BlockSpec()  # whole arrays: rows and experts are indexed inside the kernel
    meta = jnp.stack([count, jnp.asarray(expert_offset, jnp.int32)])
    operands = [group, row0, end, meta, x_pad, *[a for s in sets for a in s], *scales]
    kernel = functools.partial(_kernel, kind=kind, n_w=len(w_arrays), bm=bm, bn=bn, bk=bk, k=k,
                               swiglu=w_up is not None)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m + bm, n), x.dtype),
        grid=(group.shape[0], n // bn),
        in_specs=[whole] * len(operands),
        out_specs=whole,
        input_output_aliases={},
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="grouped_matmul_swiglu" if w_up is not None else "grouped_matmul",
    )(*operands)
    valid = jnp.arange(m) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], out[:m], 0).astype(x.dtype)


def grouped_matmul_reference(x, w, group_sizes, w_up=None):
    """Plain jnp: dequantize, then each row times its group's matrix (float32 accumulation)."""
    def dense(v):  # logical [G, K, N] in float32
        return dequantize(v, F32) if is_qarray(v) else v.astype(F32)
    m = x.shape[0]
    ends = jnp.cumsum(group_sizes)
    gid = jnp.searchsorted(ends, jnp.arange(m), side="right")
    valid = jnp.arange(m) < ends[-1]
    gid = jnp.minimum(gid, group_sizes.shape[0] - 1)
    w1 = dense(w)[gid]  # [M, K, N]
    y = jnp.einsum("MK,MKN->MN", x.astype(F32), w1)
    if w_up is not None:
        y = jax.nn.silu(y) * jnp.einsum("MK,MKN->MN", x.astype(F32), dense(w_up)[gid])
    return jnp.where(valid[:, None], y, 0).astype(x.dtype)


__all__ = ["check_shapes", "grouped_matmul", "grouped_matmul_reference", "tile_map"]
