"""Grouped matmul for the routed experts on Triton (compiled on a GPU, interpret mode elsewhere).

    y[r] = x[r] @ W[offset + g(r)]  for rows sorted by group;  with w_up:  silu(x W) * (x W_up)  (fused SwiGLU)

Work items are row tiles aligned to each group's first row: group g with s_g rows owns ceil(s_g / bm) items (an
empty group none), so every output row is written by exactly one program. The item -> (group, first row, group
end) map is computed up front in jnp and passed as int32 operands (Triton has no scalar prefetch); programs past
the last item exit at once. Each program walks K in bk steps, dots on the activations' dtype (bf16 in
production; never float32 x float32 unless the activations are float32) with float32 accumulation, and stores its
rows under a mask: rows past its group's end belong to the next group's item, and a read-modify-write would race
with it. Grid: (items, N / bn).

Weights, logical [G, K, N] (the model's [E, D, M] expert stacks, or whole [L * E, D, M] views with an offset):
- plain: [G, K, N], any float dtype, cast tile by tile to the activations' dtype;
- quant.QArray stacks, stored K last: FP8 codes two per 16-bit word [G, N, K/2] with float32 scales per 128 x 128
  tile, each 128-deep partial product scaled; NVFP4 / MXFP4 codes two per byte [G, N, K/2] with E4M3 scales per 16
  / E8M0 scales per 32, decoded by bit arithmetic (no exp2) and dequantized in registers (E2M1 x E4M3 and
  E2M1 x 2^k products are exact in bf16); NVFP4's per-matrix float32 tensor scale multiplies the accumulator.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import (
    F32,
    SMEM_BYTES,
    check_offsets,
    check_smem,
    check_tile,
    e2m1_value,
    e4m3_codes,
    e8m0_value,
    interpret_default,
    largest_tile,
    nibbles,
    word_bytes,
)
from quant.formats import FORMATS
from quant.qarray import is_qarray

NAME = "grouped_matmul"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles: bm rows (one group's), bn output columns, bk of the reduction per step; Triton's warps and stages."""

    bm: int = 16
    bn: int = 64
    bk: int = 128
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def get_default(cls, *, rows: int, groups: int, k: int, n: int, fmt: str = "plain", x_itemsize: int = 2,
                    w_itemsize: int = 2, n_weights: int = 1) -> BlockSizes:
        """bm 16 while rows are at most two per group on average (decode: each expert sees a row or two, and a
        larger tile is mostly masked), else 64; bn and bk the largest powers of two up to 64 and 128 dividing N and
        K (FP8 weights: 128 x 128, their scale tile); 3 stages. Then, until the tiles fit 90% of a block's shared
        memory (float32 operands need twice bf16's): 2 stages, a halved bk, a halved bm, a halved bn."""
        bs = cls(bm=16 if rows <= 2 * groups else 64, bn=128 if fmt == "fp8" else largest_tile(n, 64),
                 bk=128 if fmt == "fp8" else largest_tile(k, 128))
        min_bk = 128 if fmt == "fp8" else max(FORMATS[fmt].block if fmt in FORMATS else 16, 16)
        min_bn = 128 if fmt == "fp8" else 16

        def fits(b):
            return smem_bytes(b, fmt=fmt, x_itemsize=x_itemsize, w_itemsize=w_itemsize,
                              n_weights=n_weights) <= 0.9 * SMEM_BYTES
        for shrink in (lambda b: dataclasses.replace(b, num_stages=2) if b.num_stages > 2 else None,
                       lambda b: dataclasses.replace(b, bk=b.bk // 2) if b.bk > min_bk else None,
                       lambda b: dataclasses.replace(b, bm=b.bm // 2) if b.bm > 16 else None,
                       lambda b: dataclasses.replace(b, bn=b.bn // 2) if b.bn > min_bn else None):
            while not fits(bs) and shrink(bs) is not None:
                bs = shrink(bs)
        return bs


def smem_bytes(bs: BlockSizes, *, fmt: str, x_itemsize: int, w_itemsize: int = 2, n_weights: int = 1) -> int:
    """Shared memory of one block: the x tile and each weight's loaded tile(s), buffered num_stages times; each
    dequantized weight tile once (a dot operand built in registers goes through shared memory on Hopper); the
    float32 output tile once for the epilogue's layout change."""
    tile = bs.bn * bs.bk
    if fmt == "plain":
        loaded = tile * w_itemsize
    elif fmt == "fp8":
        loaded = tile + 4
    else:
        loaded = tile // 2 + tile // FORMATS[fmt].block
    per_stage = bs.bm * bs.bk * x_itemsize + n_weights * loaded
    staged = 0 if fmt == "plain" else n_weights * tile * x_itemsize
    return bs.num_stages * per_stage + staged + bs.bm * bs.bn * 4


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


def _weight_tile(kind, refs, e, k0, n0, bk, bn, dtype):
    """Expert e's weight tile in `dtype`: [bk, bn] for plain weights, [bn, bk] (K last, as stored) otherwise."""
    if kind == "plain":
        return refs[0][e, pl.ds(k0, bk), pl.ds(n0, bn)].astype(dtype)
    if kind == "fp8":
        words = refs[0][e, pl.ds(n0, bn), pl.ds(k0 // 2, bk // 2)]  # [bn, bk/2] uint16
        return e4m3_codes(word_bytes(words)).astype(dtype)
    codes_ref, scales_ref = refs[0], refs[1]
    block = FORMATS[kind].block
    values = e2m1_value(nibbles(codes_ref[e, pl.ds(n0, bn), pl.ds(k0 // 2, bk // 2)]))  # [bn, bk] float32
    sc = scales_ref[e, pl.ds(n0, bn), pl.ds(k0 // block, bk // block)]
    s = sc.astype(F32) if kind == "nvfp4" else e8m0_value(sc)
    return (values.reshape(bn, bk // block, block) * s[..., None]).reshape(bn, bk).astype(dtype)


def _kernel(group_ref, row0_ref, end_ref, meta_ref, x_ref, *rest, kind, n_w, bm, bn, bk, k, swiglu):
    """meta_ref holds (number of items, expert offset): group g reads weights [offset + g]."""
    o_ref = rest[-1]
    w_sets = [rest[i * n_w:(i + 1) * n_w] for i in range(2 if swiglu else 1)]
    tscale = rest[(2 if swiglu else 1) * n_w:-1]
    j, jn = pl.program_id(0), pl.program_id(1)

    @pl.when(j < meta_ref[0])
    def _():
        e, r0, end = group_ref[j] + meta_ref[1], row0_ref[j], end_ref[j]
        n0 = pl.multiple_of(jn * bn, bn)
        dt = x_ref.dtype

        def body(kk, accs):
            k0 = pl.multiple_of(kk * bk, bk)
            xt = x_ref[pl.ds(r0, bm), pl.ds(k0, bk)]  # [bm, bk]
            out = []
            for acc, refs in zip(accs, w_sets):
                wt = _weight_tile(kind, refs, e, k0, n0, bk, bn, dt)
                contract = 0 if kind == "plain" else 1
                part = jax.lax.dot_general(xt, wt, (((1,), (contract,)), ((), ())), preferred_element_type=F32)
                if kind == "fp8":  # one float32 scale per 128 x 128 tile: promote each 128-deep partial product
                    part = part * refs[1][e, n0 // 128, k0 // 128]
                out.append(acc + part)
            return tuple(out)

        accs = jax.lax.fori_loop(0, k // bk, body, tuple(jnp.zeros((bm, bn), F32) for _ in w_sets))
        if tscale:  # NVFP4: the per-matrix float32 tensor scale, once, on the accumulator
            accs = tuple(a * t[e] for a, t in zip(accs, tscale))
        y = jax.nn.silu(accs[0]) * accs[1] if swiglu else accs[0]
        rows = r0 + jnp.arange(bm)
        plt.store(o_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], y.astype(o_ref.dtype), mask=(rows < end)[:, None])


def operands(w):
    """(kind, weight arrays, tensor scale or None, K, N) of a plain [G, K, N] stack or a quantized one."""
    if not is_qarray(w):
        _, k, n = w.shape
        return "plain", (w,), None, k, n
    if w.batch_ndim != 1 or w.n_out != 1:
        raise ValueError(f"{NAME} takes a [G, K, N] stack; got a quantized weight of shape {w.shape} with "
                         f"{w.batch_ndim} batch axes")
    k, n = w.shape[1], w.shape[2]
    return w.fmt, (w.codes, w.scales), (w.tensor_scale if w.fmt == "nvfp4" else None), k, n


def check_shapes(kind: str, k: int, n: int, bs: BlockSizes) -> None:
    """Clear errors for what the kernel does not support, before any tracing or lowering."""
    for name in ("bm", "bn", "bk"):
        check_tile(NAME, name, getattr(bs, name))
    if k % bs.bk:
        raise ValueError(f"{NAME}: K={k} must be a multiple of bk={bs.bk}")
    if n % bs.bn:
        raise ValueError(f"{NAME}: N={n} must be a multiple of bn={bs.bn}")
    if kind in ("nvfp4", "mxfp4") and bs.bk % FORMATS[kind].block:
        raise ValueError(f"{NAME}: bk={bs.bk} must hold whole {kind} scale blocks of {FORMATS[kind].block}")
    if kind == "fp8" and (bs.bk != 128 or bs.bn != 128):
        raise ValueError(f"{NAME}: FP8 weights need bk = bn = 128 (one 128x128 scale tile per step), got "
                         f"bk={bs.bk}, bn={bs.bn}")


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "debug"))
def grouped_matmul(x, w, group_sizes, w_up=None, expert_offset=0, *, block_sizes: BlockSizes | None = None,
                   interpret: bool | None = None, debug: bool = False):
    """y[r] = x[r] @ W[expert_offset + g(r)] (with w_up: silu(x W) * (x W_up)), rows sorted by group.

    x: [M, K]; w, w_up: [G', K, N] arrays or quant.QArray stacks, group g using matrix expert_offset + g (a layer's
    experts inside a whole [L*E, ...] stack, unsliced); group_sizes: [G] int32 summing to <= M (rows past the sum
    come back as zeros). block_sizes: default `BlockSizes.get_default`; interpret: default on unless on a GPU.
    Returns [M, N] in x's dtype.
    """
    m = x.shape[0]
    kind, w_arrays, tscale, k, n = operands(w)
    if x.shape[1] != k:
        raise ValueError(f"{NAME}: x has K={x.shape[1]}, the weights K={k}")
    sets, scales = [w_arrays], [tscale] if tscale is not None else []
    if w_up is not None:
        kind2, up_arrays, tscale2, k2, n2 = operands(w_up)
        if (kind2, k2, n2) != (kind, k, n):
            raise ValueError(f"{NAME}: gate and up weights must share format and shape")
        sets.append(up_arrays)
        scales += [tscale2] if tscale2 is not None else []
    bs = block_sizes or BlockSizes.get_default(rows=m, groups=group_sizes.shape[0], k=k, n=n, fmt=kind,
                                               x_itemsize=x.dtype.itemsize,
                                               w_itemsize=w_arrays[0].dtype.itemsize, n_weights=len(sets))
    check_shapes(kind, k, n, bs)
    check_smem(NAME, smem_bytes(bs, fmt=kind, x_itemsize=x.dtype.itemsize, w_itemsize=w_arrays[0].dtype.itemsize,
                                n_weights=len(sets)), bs)
    group, row0, end, count = tile_map(group_sizes.astype(jnp.int32), m, bs.bm)
    x_pad = jnp.pad(x, ((0, bs.bm), (0, 0)))  # a tile starting at any row stays in bounds
    out_shape = jax.ShapeDtypeStruct((m + bs.bm, n), x.dtype)
    check_offsets(NAME, {"x": x_pad, "output": out_shape,
                         **{f"weight array {i}": a for i, a in enumerate(a for s in sets for a in s)}})
    meta = jnp.stack([count, jnp.asarray(expert_offset, jnp.int32)])
    whole = pl.BlockSpec()  # whole arrays: rows and experts are indexed inside the kernel
    operands_ = [group, row0, end, meta, x_pad, *[a for s in sets for a in s], *scales]
    out = pl.pallas_call(
        functools.partial(_kernel, kind=kind, n_w=len(w_arrays), bm=bs.bm, bn=bs.bn, bk=bs.bk, k=k,
                          swiglu=w_up is not None),
        out_shape=out_shape,
        grid=(group.shape[0], n // bs.bn),
        in_specs=[whole] * len(operands_),
        out_specs=whole,
        interpret=interpret_default() if interpret is None else interpret,
        debug=debug,
        compiler_params=plt.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        name=NAME + ("_swiglu" if w_up is not None else ""),
    )(*operands_)
    valid = jnp.arange(m) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], out[:m], 0).astype(x.dtype)
