"""QArray: a quantized weight as a pytree of plain arrays, which jit, scan, shard_map, device_put and orbax handle
like any parameter, plus the static description needed to read it back.

Layout. A logical weight W (say [L, E, D, M], reduction axis D) is stored with its reduction axis moved last,
the way a kernel tile wants to read it and the way DeepSeek/HF checkpoints store [out, in]:
    codes   uint8 [L, E, M, D/2]   two E2M1 codes per byte (NVFP4/MXFP4), or uint16 [L, E, M, D/2] two E4M3 codes
            per 16-bit word (FP8; quant.formats.pack_bytes: words keep the Triton kernels' offsets from wrapping)
    scales  [L, E, M, D/16] E4M3 (NVFP4) | [L, E, M, D/32] uint8 E8M0 (MXFP4) | [L, E, ceil(M/128), ceil(D/128)]
            float32 (FP8, 128x128 tiles over the flattened output rows and D)
    tensor_scale  float32 [L, E]: NVFP4's per-tensor scale, one per matrix (each layer and expert)
    input_scale   float32 [L, E] or None: static activation scale from calibration (W4A4 / W8A8), None = dynamic
Leading "batch" axes (layers, experts) are the axes before the matrix; `n_out` counts the matrix's output axes,
`k_axis` is the reduction axis of the logical shape, negative, so both stay true when scan or indexing strips
leading axes. A reduction over several consecutive axes (the output projection's heads x value dims, [N, V, D]
reduced over N*V, as DeepSeek's FP8 release quantizes o_proj) has them flattened into one K, their sizes in
`k_dims`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from quant import formats as F

ACT_FORMATS = (None, *F.FORMATS)


@struct.dataclass
class QArray:
    codes: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array | None = None
    input_scale: jax.Array | None = None
    fmt: str = struct.field(pytree_node=False, default="nvfp4")
    k_axis: int = struct.field(pytree_node=False, default=-2)
    n_out: int = struct.field(pytree_node=False, default=1)
    act: str | None = struct.field(pytree_node=False, default=None)
    dtype: str = struct.field(pytree_node=False, default="float32")
    mx_rule: str = struct.field(pytree_node=False, default="ocp")
    k_dims: tuple[int, ...] = struct.field(pytree_node=False, default=())  # >1 reduction axes: their sizes

    @property
    def k_ndim(self) -> int:
        return max(len(self.k_dims), 1)

    @property
    def k(self) -> int:
        return self.codes.shape[-1] * F.FORMATS[self.fmt].codes_per_element

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape (what `dequantize` returns)."""
        moved = (*self.codes.shape[:-1], *(self.k_dims or (self.k,)))
        nd = len(moved)
        perm = _moved_perm(nd, self.k_axis, self.k_ndim)
        out = [0] * nd
        for i, p in enumerate(perm):
            out[p] = moved[i]
        return tuple(out)

    @property
    def ndim(self) -> int:
        return self.codes.ndim - 1 + self.k_ndim

    @property
    def batch_ndim(self) -> int:
        return self.codes.ndim - self.n_out - 1

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes, scales and the float32 per-tensor scalars."""
        leaves = [x for x in (self.codes, self.scales, self.tensor_scale, self.input_scale) if x is not None]
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)


def _moved_perm(nd: int, k_axis: int, k_ndim: int = 1) -> list[int]:
    """Logical axis index of each stored axis: the logical axes with the reduction axes (k_ndim of them from
    k_axis on) moved last, in order."""
    k = k_axis % nd
    ks = list(range(k, k + k_ndim))
    return [i for i in range(nd) if i not in ks] + ks


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


@struct.dataclass
class Probe:
    """Calibration stand-in for a weight: used as the weight itself, and every activation that meets it reports its
    amax (per matrix of the stack: `ids` has the weight's leading batch shape) to `model.quantize`."""

    w: jax.Array
    ids: jax.Array  # float32 [*batch], unique per matrix

    @property
    def shape(self):
        return self.w.shape

    @property
    def batch_ndim(self) -> int:
        return self.ids.ndim


_PROBE_SINK: list = []  # the active recorder, set by model.quantize


def _record(ids, amax):
    if _PROBE_SINK:
        _PROBE_SINK[-1](np.asarray(ids), np.asarray(amax))


def quantizes_activation(w) -> bool:
    """Whether activations meeting w are quantized (or observed, in calibration)."""
    return (is_qarray(w) and w.act is not None) or isinstance(w, Probe)


def reduction_last(w: jax.Array, k_axis: int, k_ndim: int = 1) -> tuple[jax.Array, tuple[int, ...]]:
    """w with its reduction axes moved last and flattened into one, and their sizes when there are several."""
    nd = w.ndim
    moved = jnp.transpose(w, _moved_perm(nd, k_axis, k_ndim))
    k_dims = tuple(moved.shape[nd - k_ndim:]) if k_ndim > 1 else ()
    return moved.reshape(*moved.shape[:nd - k_ndim], -1), k_dims


def _batch_amax(w_moved: jax.Array, batch_ndim: int) -> jax.Array:
    return jnp.max(jnp.abs(w_moved.astype(F.F32)), axis=tuple(range(batch_ndim, w_moved.ndim)))


def quantize(w: jax.Array, fmt: str, *, k_axis: int = -2, batch_ndim: int = 0, amax: jax.Array | None = None,
             act: str | None = None, input_scale: jax.Array | None = None, mx_rule: str = "ocp",
             block_scales: jax.Array | None = None, k_ndim: int = 1) -> QArray:
    """Quantize a logical weight. k_axis: its (first) reduction axis, k_ndim consecutive axes reduced together;
    batch_ndim: how many leading axes are a stack of independent matrices (layers, experts), each with its own
    per-tensor scale; amax [batch]: the per-tensor amax to use (gate and up share one); act: the activation format
    for W4A4/W8A8 (None: weights only)."""
    if fmt not in F.FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; one of {tuple(F.FORMATS)}")
    if act not in ACT_FORMATS:
        raise ValueError(f"unknown activation format {act!r}; one of {ACT_FORMATS}")
    nd = w.ndim
    if not -nd <= k_axis < 0 or k_axis + k_ndim > 0:
        raise ValueError(f"k_axis must be negative and its {k_ndim} axes within the {nd} axes of {w.shape}, got "
                         f"{k_axis}")
    n_out = nd - batch_ndim - k_ndim
    if n_out < 0 or (k_axis % nd) < batch_ndim:
        raise ValueError(f"shape {w.shape}: the reduction axis {k_axis} lies in the {batch_ndim} batch axes")
    moved, k_dims = reduction_last(w.astype(F.F32), k_axis, k_ndim)
    kw = {"fmt": fmt, "k_axis": k_axis, "n_out": n_out, "act": act, "dtype": jnp.dtype(w.dtype).name,
          "mx_rule": mx_rule, "input_scale": None if input_scale is None else jnp.asarray(input_scale, F.F32),
          "k_dims": k_dims}
    if fmt == "nvfp4":
        amax = _batch_amax(moved, batch_ndim) if amax is None else jnp.asarray(amax, F.F32)
        s_t = F.nvfp4_tensor_scale(amax)
        codes, scales = F.nvfp4_quantize(moved, s_t.reshape(*s_t.shape, *([1] * (n_out + 1))), block_scales)
        return QArray(F.pack_nibbles(codes), scales, s_t, **kw)
    if fmt == "mxfp4":
        codes, scales = F.mxfp4_quantize(moved, mx_rule, block_scales)
        return QArray(F.pack_nibbles(codes), scales, None, **kw)
    rows = moved.reshape(*moved.shape[:batch_ndim], -1, moved.shape[-1])  # [..., out rows, K]
    q, s = F.fp8_quantize_2d(rows)
    return QArray(F.pack_bytes(q.reshape(moved.shape)), s, None, **kw)


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """The logical weight, in `dtype` (default: the dtype it was quantized from)."""
    dtype = jnp.dtype(dtype or q.dtype)
    if q.fmt == "nvfp4":
        s_t = q.tensor_scale.reshape(*q.tensor_scale.shape, *([1] * (q.n_out + 1)))
        moved = F.nvfp4_dequantize(F.unpack_nibbles(q.codes), q.scales, s_t, dtype)
    elif q.fmt == "mxfp4":
        moved = F.mxfp4_dequantize(F.unpack_nibbles(q.codes), q.scales, dtype)
    else:
        codes = F.unpack_bytes(q.codes)
        rows = codes.reshape(*codes.shape[:q.batch_ndim], -1, codes.shape[-1])
        moved = F.fp8_dequantize_2d(rows, q.scales, dtype).reshape(codes.shape)
    moved = moved.reshape(*moved.shape[:-1], *(q.k_dims or (q.k,)))
    return jnp.transpose(moved, np.argsort(_moved_perm(moved.ndim, q.k_axis, q.k_ndim)))


def weight(w, dtype) -> jax.Array:
    """A plain array as is (cast), a QArray dequantized: the XLA path's on-the-fly dequantization."""
    if isinstance(w, Probe):
        return w.w.astype(dtype)
    return dequantize(w, dtype) if is_qarray(w) else w.astype(dtype)


def quantize_activation(x: jax.Array, fmt: str | None, input_scale: jax.Array | None = None,
                        batch_ndim: int = 0) -> jax.Array:
    """Quantize-dequantize activations x [*batch, ..., K] per block along K, as the low-precision matmul sees them.

    nvfp4: per-tensor scale from the calibrated amax (`input_scale` [*batch] = amax / (6*448), one per matrix) or,
    without one, from x's own amax (per leading batch index); E4M3 block scales of 16 computed here, at run time.
    mxfp4: OCP scales per 32. fp8: DeepSeek's dynamic 1x128 blocks. None: x unchanged.
    """
    if fmt is None:
        return x
    if fmt == "nvfp4":
        ones = (1,) * (x.ndim - batch_ndim)
        if input_scale is None:
            amax = jnp.max(jnp.abs(x.astype(F.F32)), axis=tuple(range(batch_ndim, x.ndim)))
            s_t = F.nvfp4_tensor_scale(amax)
        else:
            s_t = jnp.asarray(input_scale, F.F32)
        s_t = s_t.reshape(*s_t.shape, *ones)
        codes, sb = F.nvfp4_quantize(x, s_t)
        return F.nvfp4_dequantize(codes, sb, s_t, x.dtype)
    if fmt == "mxfp4":
        codes, sb = F.mxfp4_quantize(x)
        return F.mxfp4_dequantize(codes, sb, x.dtype)
    q, s = F.fp8_quantize_1d(x)
    return F.fp8_dequantize_1d(q, s, x.dtype)


def activation(x: jax.Array, w) -> jax.Array:
    """x as the matmul with weight w sees it: quantized when w is a QArray with an activation format. When w is a
    stack of matrices (leading batch axes), x carries the same leading axes (one slice per matrix)."""
    if isinstance(w, Probe):
        amax = jnp.max(jnp.abs(x.astype(F.F32)), axis=tuple(range(w.batch_ndim, x.ndim)))
        jax.debug.callback(_record, w.ids, amax)
        return x
    if not is_qarray(w) or w.act is None:
        return x
    if w.k_dims:  # the reduction axes, last in x, quantized as one K (as the matmul over them sees it)
        flat = x.reshape(*x.shape[:x.ndim - len(w.k_dims)], -1)
        return quantize_activation(flat, w.act, w.input_scale, w.batch_ndim).reshape(x.shape)
    return quantize_activation(x, w.act, w.input_scale, w.batch_ndim)


def map_leading(fn, w):
    """Apply fn to every array of a plain or quantized weight whose leading axes are batch axes (reshape, take,
    dynamic index over layers/experts): codes, scales, and the per-matrix scalars alike."""
    if isinstance(w, Probe):
        return w.replace(w=fn(w.w), ids=fn(w.ids))
    if not is_qarray(w):
        return fn(w)
    return w.replace(codes=fn(w.codes), scales=fn(w.scales),
                     tensor_scale=None if w.tensor_scale is None else fn(w.tensor_scale),
                     input_scale=None if w.input_scale is None else fn(w.input_scale))


def spec_for(spec, w):
    """The PartitionSpec(s) for w given the logical weight's spec: plain arrays keep it; a QArray's codes and
    scales move the reduction axis's entry last, its per-matrix scalars keep the batch axes' entries."""
    from jax.sharding import PartitionSpec as P

    if not is_qarray(w):
        return spec
    entries = list(spec) + [None] * (w.ndim - len(spec))
    perm = _moved_perm(w.ndim, w.k_axis, w.k_ndim)
    k_mesh = [a for i in perm[w.ndim - w.k_ndim:] for a in ((entries[i],) if isinstance(entries[i], str)
                                                            else (entries[i] or ()))]
    k_entry = None if not k_mesh else k_mesh[0] if len(k_mesh) == 1 else tuple(k_mesh)
    moved = P(*[entries[i] for i in perm[:w.ndim - w.k_ndim]], k_entry)
    if w.fmt == "fp8":  # 128 x 128 tiles over (flattened output rows, K): rows split by the first output axis
        out_entries = [entries[i] for i in perm[w.batch_ndim:w.ndim - w.k_ndim]]
        if any(e is not None for e in out_entries[1:]):
            raise ValueError(f"an FP8 weight's tiles flatten its output axes: only the first may be sharded, "
                             f"got {tuple(spec)}")
        scales = P(*entries[:w.batch_ndim], out_entries[0] if out_entries else None, k_entry)
    else:
        scales = moved
    batch = P(*entries[:w.batch_ndim])
    return w.replace(codes=moved, scales=scales,
                     tensor_scale=None if w.tensor_scale is None else batch,
                     input_scale=None if w.input_scale is None else batch)
