"""Tensor-parallel inference of the unstacked layout (model/layout.py) over the mesh's tensor axis.

Batch-1 decode on a CPU is a chain of small matrix-vector products, each of which XLA runs on one core; run as
one program per host device (`--xla_force_host_platform_device_count=N`), the same chain is split N ways and the
cores read their halves of every weight at the same time. Megatron-style, with the library's rules
(sharding/rules.py): attention heads, dense / shared / routed expert widths and the LM head's vocabulary over
`tensor`; the latent cache, the router and the embedding replicated. The low-rank q and kv down-projections
(wq_a [D, Q], wkv_a [D, C+R]) are split by columns where whole slices (and whole scale blocks) allow and the
reads saved outweigh one collective more per layer (SPLIT_MIN_BYTES): each device computes its columns and one
all-gather assembles c_q and the latent. For `small` on two devices that is 1.4 MB less per device and layer
(11 MB of about 254 MB a step); `tiny`'s stay whole.

Per layer:  x[B, T, D] -> [c_q | c_kv, k_pe] (columns: all_gather(tensor)) -> attention over H/tp heads
            -> psum(tensor) -> + x -> FFN over width F/tp -> psum(tensor)
Per step:   logits[B, V/tp] -> all_gather(tensor) -> logits[B, V] on every device.

Every device routes its replicated copy of x, so all pick the same experts and run their slice of each.
Activation quantization that scales by the input's own amax (no calibrated input scale) sees each device's
slice of the expert hidden state, so W4A4 without calibration rounds differently from one device; weights-only
and calibrated recipes, and plain weights, give the single-device logits up to float summation order.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from model.config import Config
from model.params import Moe, OutMajorMlp, Params, Transposed
from sharding.mesh import mesh_sizes
from sharding.rules import ShardingRules, check_divisible, param_specs, place_by_specs

AXIS = "tensor"


def use_host_devices(n: int) -> int:
    """Ask for n CPU devices (one per core is the useful number) before JAX starts its backend; returns how many
    there are (unchanged if the backend is already running, e.g. in a notebook that has computed something)."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass
    return jax.device_count()


def check_tp_mesh(cfg: Config, mesh) -> None:
    """The unstacked layout shards over `tensor` only; a clear error for anything else, before any compilation."""
    sizes = mesh_sizes(mesh)
    other = {a: n for a, n in sizes.items() if a != AXIS and n > 1}
    if other:
        raise ValueError(f"the unstacked layout runs tensor-parallel only: mesh {sizes} also splits {other}; "
                         f"use a mesh such as 'tensor={jax.device_count()}'")
    check_divisible(cfg, mesh)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def unstacked_specs(params: Params, cfg: Config, rules: ShardingRules = ShardingRules(), mesh=None) -> Params:
    """PartitionSpecs of the logical weights for params in the unstacked layout: the stacked rules without the
    layer (and expert) axes, the embedding and the MTP module replicated. With the mesh, the down-projections
    wq_a and wkv_a split their columns over `tensor` where each device gets whole columns and whole scale blocks
    (plain, NVFP4 and MXFP4 weights; an FP8 weight needs a multiple of 128 columns per device) and the split
    saves each device at least SPLIT_MIN_BYTES of reads in that layer, else stay whole."""
    specs = param_specs(cfg, rules, with_mtp=params.mtp is not None)

    def drop(n):
        return lambda s: P(*tuple(s)[n:])

    def layers(stack_spec, stack):
        if stack is None:
            return None
        out = []
        for layer in stack:
            s = jax.tree.map(drop(1), stack_spec, is_leaf=_is_spec)
            if isinstance(layer.ffn, Moe):
                f = stack_spec.ffn
                if layer.ffn.we3 is None:  # one OutMajorMlp per expert
                    one = _out_major_specs(drop(2)(f.we1), drop(2)(f.we2))
                    s = s.replace(ffn=s.ffn.replace(we1=tuple(one for _ in layer.ffn.we1), we3=None, we2=None))
                else:
                    s = s.replace(ffn=s.ffn.replace(**{k: tuple(drop(2)(getattr(f, k)) for _ in getattr(layer.ffn, k))
                                                       for k in ("we1", "we3", "we2")}))
                if isinstance(layer.ffn.shared, OutMajorMlp):
                    s = s.replace(ffn=s.ffn.replace(shared=_out_major_specs(s.ffn.shared.w1, s.ffn.shared.w2)))
            elif isinstance(layer.ffn, OutMajorMlp):
                s = s.replace(ffn=_out_major_specs(s.ffn.w1, s.ffn.w2))
            if mesh is not None:
                s = s.replace(attn=s.attn.replace(**_down_projection_specs(layer.attn, mesh)))
            out.append(s)
        return tuple(out)

    def replicated(tree):
        return jax.tree.map(lambda s: P(), tree, is_leaf=_is_spec)

    head = specs.lm_head
    if isinstance(params.lm_head, Transposed):
        head = Transposed(P(*reversed(_full(head, 2))))
    return specs.replace(embed=P(), mtp=None if specs.mtp is None else replicated(specs.mtp),
                         dense_layers=layers(specs.dense_layers, params.dense_layers),
                         moe_layers=layers(specs.moe_layers, params.moe_layers), lm_head=head)


def _full(spec: P, ndim: int) -> tuple:
    return (*spec, *(None,) * (ndim - len(spec)))


def _out_major_specs(w1: P, w2: P) -> OutMajorMlp:
    """Specs of an OutMajorMlp from those of the Mlp it holds: w1 [D, F] -> w13 [2, F, D], w2 [F, D] -> w2t [D, F]."""
    d, f = _full(w1, 2)
    return OutMajorMlp(w13=P(None, f, d), w2t=P(*reversed(_full(w2, 2))))


# A split down-projection costs one all-gather per layer: on this project's 2-core CPU machine tens of
# microseconds, the time a core takes to read about 1 MB. Below that saving per device and layer the weights
# stay whole.
SPLIT_MIN_BYTES = 1 << 20


def _down_projection_specs(attn, mesh) -> dict[str, P]:
    """Specs of one layer's wq_a and wkv_a: split by columns (see `_column_split`) when that saves a device
    SPLIT_MIN_BYTES of reads in this layer (the price is this layer's all-gather), else both whole."""
    from quant.qarray import is_qarray

    def nbytes(w):
        return w.nbytes if is_qarray(w) else w.size * w.dtype.itemsize

    n = mesh_sizes(mesh).get(AXIS, 1)
    specs = {k: _column_split(getattr(attn, k), mesh) for k in ("wq_a", "wkv_a")}
    saved = sum(nbytes(getattr(attn, k)) * (n - 1) // n for k, sp in specs.items() if sp == P(None, AXIS))
    return specs if saved >= SPLIT_MIN_BYTES else dict.fromkeys(specs, P(None, None))


def _column_split(w, mesh) -> P:
    """P(None, tensor) for a [D, W] weight whose W columns split into whole slices (and whole scale blocks) over
    the mesh's tensor axis, else P(None, None)."""
    from quant.qarray import is_qarray
    from sharding.rules import _check_quantized

    n = mesh_sizes(mesh).get(AXIS, 1)
    split = P(None, AXIS)
    if n == 1 or w.shape[-1] % n:
        return P(None, None)
    if is_qarray(w):
        try:
            _check_quantized("down-projection", w, split, mesh)
        except ValueError:
            return P(None, None)
    return split


def _leaf_specs(params: Params, cfg: Config, mesh) -> Params:
    """Specs per array leaf: a quantized weight's codes and scales follow its logical spec (quant.spec_for)."""
    from quant.qarray import is_qarray, spec_for

    return jax.tree.map(lambda s, w: spec_for(s, w), unstacked_specs(params, cfg, mesh=mesh), params,
                        is_leaf=lambda x: _is_spec(x) or is_qarray(x))


def shard_unstacked(params: Params, cfg: Config, mesh) -> Params:
    """Place unstacked params on the mesh for tensor-parallel prefill / decode / generate (pass the same mesh)."""
    from model.layout import is_unstacked
    if not is_unstacked(params):
        raise ValueError("shard_unstacked takes params in the unstacked layout (model.layout.unstack_layers); "
                         "stacked params place with sharding.shard_params")
    mesh = getattr(mesh, "mesh", mesh)
    check_tp_mesh(cfg, mesh)
    return place_by_specs(params, unstacked_specs(params, cfg, mesh=mesh), mesh)


def tensor_parallel(fn, params: Params, cache, *args, cfg: Config, mesh):
    """Run fn(params, cache, *args, tp_axis=AXIS) -> (logits [..., V/tp], cache) on every device of the mesh and
    return (logits [..., V], cache) replicated. args: replicated arrays (tokens, lengths)."""
    mesh = getattr(mesh, "mesh", mesh)
    check_tp_mesh(cfg, mesh)
    cache_specs = jax.tree.map(lambda _: P(), cache)

    def local(params, cache, *args):
        logits, cache = fn(params, cache, *args, tp_axis=AXIS)
        with jax.named_scope("tp_logits_all_gather"):
            return jax.lax.all_gather(logits, AXIS, axis=logits.ndim - 1, tiled=True), cache

    run = jax.shard_map(local, mesh=mesh, in_specs=(_leaf_specs(params, cfg, mesh), cache_specs, *[P()] * len(args)),
                        out_specs=(P(), cache_specs), check_vma=False)
    return run(params, cache, *args)
