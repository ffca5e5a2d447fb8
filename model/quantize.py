"""Quantizing the model: a recipe (quant/recipes.py) applied to the parameter tree by walking the declarations,
and the post-training calibration that gives W4A4 its static activation scales and an FP8 cache its scales.

Every parameter declares its group, its reduction axis and its stack axes (model/params.py), so one walk serves
every recipe: a matrix whose group the recipe names becomes a QArray of the rule's format, quantized along its
reduction axis, one per-tensor scale per stacked matrix; everything else stays as it is. A weight loaded already
quantized (the FP8 release, model/io/hf_checkpoint.py) keeps its own codes where the rule asks for what it is, is
dequantized and quantized again where the rule asks for another format (R1-FP4's experts from the FP8 release,
as the published checkpoint was made), and stays as loaded where the recipe names no rule for it. Two structural rules,
as the published recipe has them: gate and up (w1 / w3, we1 / we3) share one NVFP4 per-tensor weight amax, and
up takes gate's input scale (they read the same input).

Calibration replaces every weight that a recipe can quantize by a `Probe` (the weight itself, plus ids) and runs
prefill over the calibration sequences with the gather expert path, so each routed expert sees exactly the
tokens routed to it; each probed activation reports its amax through a host callback. Experts no calibration
token reached take the largest input amax of their layer. A margin (default 2x) is applied: under-estimating the
amax saturates the block scales at run time, over-estimating it costs almost nothing (docs/quantization.md).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import init_cache
from model.config import Config
from model.forward import check_tokens, prefill
from model.params import Params, is_info, param_infos
from model.plan import ExecutionPlan
from quant import formats as F
from quant import qarray
from quant.qarray import Probe
from quant.recipes import GROUPS, Recipe, get_recipe

SHARES_INPUT = {"w3": "w1", "we3": "we1"}  # up reads gate's input: one input scale (and no probe of its own)
SHARES_AMAX = {"w1": "w3", "we1": "we3", "w3": "w1", "we3": "we1"}  # gate and up: one NVFP4 weight amax


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Static scales from `calibrate`: per probed weight (by its path in the tree, e.g. ".moe_layers.ffn.we1") the
    input scale amax * margin / (6 * 448) with the weight's stack shape; the FP8 cache's [L, 2] (c_kv, k_pe)
    scales amax * margin / 448; and the raw amax per path."""

    inputs: dict[str, jax.Array]
    kv: jax.Array
    amax: dict[str, np.ndarray]


def _name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _sibling(path: str, name: str) -> str:
    return path.rsplit(".", 1)[0] + "." + name


def _leaves(params: Params, cfg: Config):
    """[(path, declaration, array)] over the parameters (with or without the MTP module)."""
    return _leaves_of(params, param_infos(cfg, with_mtp=params.mtp is not None))


def _leaves_of(tree, infos):
    """[(path, declaration, array)] over any part of the parameters and its declarations (same structure)."""
    decl = {jax.tree_util.keystr(p): i for p, i in jax.tree_util.tree_flatten_with_path(infos, is_leaf=is_info)[0]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=qarray.is_qarray)
    return [(jax.tree_util.keystr(p), decl[jax.tree_util.keystr(p)], x) for p, x in flat], treedef


def quantize_params(params: Params, cfg: Config, recipe: str | Recipe, calib: Calibration | None = None) -> Params:
    """The parameter tree with the recipe's linears replaced by QArrays (everything else untouched: the same
    arrays, not copies).

    calib: from `calibrate`, for static per-tensor activation scales (NVFP4 W4A4 needs them; without them the
    per-tensor activation scale is computed at run time from each activation's own amax)."""
    return quantize_tree(params, param_infos(cfg, with_mtp=params.mtp is not None), recipe,
                         calib.inputs if calib is not None else {})


def quantize_tree(tree, infos, recipe: str | Recipe, inputs: dict | None = None):
    """quantize_params on any part of the parameters with its declarations: one layer (a conversion quantizes
    layer by layer; every scale is per matrix, so the result is the whole model's, sliced). inputs: static input
    scales by path within `tree`."""
    r = get_recipe(recipe)
    if not r.quantizes:
        return tree
    leaves, treedef = _leaves_of(tree, infos)
    by_path = {path: x for path, _, x in leaves}
    inputs = inputs or {}
    out = [x for _, _, x in leaves]
    todo, operands, jobs = [], [], []
    for i, (path, info, x) in enumerate(leaves):
        name = _name(path)
        rule = r.rule(info.group, name) if info.group in GROUPS else None
        if rule is None or info.reduction is None or _already(x, rule, r):
            continue  # a weight loaded quantized (the FP8 release) keeps its own codes unless a rule differs
        shares = rule.fmt == "nvfp4" and name in SHARES_AMAX
        todo.append(i)
        operands.append((x, by_path[_sibling(path, SHARES_AMAX[name])] if shares else None,
                         inputs.get(_sibling(path, SHARES_INPUT.get(name, name)))))
        jobs.append(_Job(path, tuple(info.shape), tuple(info.logical_axes), info.group, name, info.k_axis,
                         info.batch_ndim, info.k_ndim))
    for i, q in zip(todo, _quantize_leaves(operands, jobs=tuple(jobs), recipe=r)):
        out[i] = q
    return treedef.unflatten(out)


@dataclasses.dataclass(frozen=True)
class _Job:
    """What quantizing one weight needs to know statically (and to name it in an error)."""
    path: str
    shape: tuple
    axes: tuple
    group: str
    name: str
    k_axis: int
    batch_ndim: int
    k_ndim: int


# The quantized weights of a tree in one compiled program: weight by weight, each would compile its own
# quantizer (seconds per recipe on CPU, for the same values). The weights a recipe leaves alone never enter it.
@partial(jax.jit, static_argnames=("jobs", "recipe"))
def _quantize_leaves(operands, jobs: tuple[_Job, ...], recipe: Recipe):
    out = []
    for (x, sibling, input_scale), job in zip(operands, jobs):
        x = _plain(x)
        amax = None
        if sibling is not None:  # gate and up share one amax
            amax = jnp.maximum(_amax(x, job.batch_ndim), _amax(_plain(sibling), job.batch_ndim))
        try:
            out.append(recipe.quantize(x, job.group, job.name, k_axis=job.k_axis, batch_ndim=job.batch_ndim,
                                       amax=amax, input_scale=input_scale, k_ndim=job.k_ndim))
        except ValueError as e:  # a shape the format cannot block: say which parameter
            raise ValueError(f"recipe {recipe.name!r} cannot quantize {job.path} {job.shape} "
                             f"[{', '.join(map(str, job.axes))}]: {e}") from None
    return out


def with_compute_dtype(params: Params, cfg: Config, dtype: str) -> tuple[Params, Config]:
    """(params, cfg) computing in `dtype`: plain weights cast to their declared dtype under it (the router bias
    stays float32), quantized ones keep their codes and scales and dequantize to it."""
    cfg = dataclasses.replace(cfg, dtype=dtype)
    infos = param_infos(cfg, with_mtp=params.mtp is not None)

    def one(info, x):
        if qarray.is_qarray(x):
            return x.replace(dtype=jnp.dtype(dtype).name)
        return x.astype(info.dtype)
    return jax.tree.map(one, infos, params, is_leaf=is_info), cfg


@jax.jit  # one program for the tree: op by op, every weight's decode would compile its own few operations
def dequantize_all(tree):
    """Every QArray of a tree as the plain array of its dtype (the FP8 release as BF16 weights)."""
    return jax.tree.map(_plain, tree, is_leaf=qarray.is_qarray)


def _plain(x):
    """A weight loaded quantized as the plain array of its dtype (the model's: BF16 for the release)."""
    return qarray.dequantize(x) if qarray.is_qarray(x) else x


def _already(x, rule, recipe: Recipe) -> bool:
    """x is a QArray in exactly the rule's format (then requantizing it would only round it again)."""
    return (qarray.is_qarray(x) and x.fmt == rule.fmt and x.act == (rule.fmt if rule.act else None)
            and not recipe.search)


def _amax(w, batch_ndim: int):
    return jnp.max(jnp.abs(w.astype(F.F32)), axis=tuple(range(batch_ndim, w.ndim)))


def _probed(params: Params, cfg: Config):
    """(params with a Probe in place of every weight a recipe can quantize, {path: ids})."""
    leaves, treedef = _leaves(params, cfg)
    keys, out = {}, []
    for n, (path, info, x) in enumerate(leaves):
        if info.group in GROUPS and info.reduction is not None and _name(path) not in SHARES_INPUT:
            shape = x.shape[:info.batch_ndim]
            ids = ((n + 1) * 100000 + np.arange(int(np.prod(shape)))).reshape(shape).astype(np.float32)
            keys[path] = ids
            x = Probe(x, jnp.asarray(ids))
        out.append(x)
    return treedef.unflatten(out), keys


def calibrate(params: Params, cfg: Config, sequences, *, margin: float = 2.0) -> Calibration:
    """Run the calibration sequences (lists of token ids; each is run alone, batch 1) and return the static scales
    `quantize_params` and an FP8 cache take."""
    sequences = list(sequences)  # a [N, T] array is N sequences
    if not sequences:
        raise ValueError("calibration needs at least one sequence")
    for i, seq in enumerate(sequences):
        a = np.asarray(seq)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"calibration sequence {i} must be a non-empty list of token ids, got shape {a.shape}")
        check_tokens(cfg, a, what=f"calibration sequence {i} token ids")
    # float32 whatever the serving dtype: amax barely depends on it, and XLA:CPU has no batched bf16 x bf16 -> f32
    # dot for the gather path
    # (weights loaded quantized, the FP8 release, are observed through their dequantized values)
    params = jax.tree.map(lambda x: qarray.dequantize(x, jnp.float32) if qarray.is_qarray(x) else
                          x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params,
                          is_leaf=qarray.is_qarray)
    cfg = dataclasses.replace(cfg, dtype="float32")
    probed, keys = _probed(params.replace(mtp=None), cfg)
    seen: dict[float, float] = {}

    def sink(ids, amax):
        for i, a in zip(ids.reshape(-1).tolist(), np.broadcast_to(amax, ids.shape).reshape(-1).tolist()):
            seen[i] = max(seen.get(i, 0.0), a)

    kv_amax = np.zeros((cfg.num_hidden_layers, 2), np.float32)
    plan = ExecutionPlan(experts="gather")
    qarray._PROBE_SINK.append(sink)
    try:
        for seq in sequences:
            seq = np.asarray(seq, np.int32)[None]
            cache = init_cache(cfg, 1, seq.shape[1])
            _, cache = prefill(probed, cache, seq, np.array([seq.shape[1]]), cfg=cfg, plan=plan)
            jax.effects_barrier()
            kv_amax = np.maximum(kv_amax, np.stack([np.abs(np.asarray(cache.c_kv, np.float32)).max((1, 2, 3)),
                                                    np.abs(np.asarray(cache.k_pe, np.float32)).max((1, 2, 3))], -1))
    finally:
        qarray._PROBE_SINK.pop()

    amax = {}
    for path, ids in keys.items():
        a = np.vectorize(lambda i: seen.get(float(i), np.nan))(ids).astype(np.float32)
        if a.ndim == 2 and np.isnan(a).any():  # routed experts no token reached: their layer's largest
            a = np.where(np.isnan(a), np.nanmax(np.where(np.isnan(a), -np.inf, a), axis=1, keepdims=True), a)
        amax[path] = np.nan_to_num(a, nan=0.0)
    inputs = {path: jnp.asarray(F.nvfp4_tensor_scale(jnp.asarray(a * margin))) for path, a in amax.items()}
    kv = jnp.asarray(np.where(kv_amax > 0, kv_amax * margin / F.E4M3_MAX, 1.0), jnp.float32)
    return Calibration(inputs=inputs, kv=kv, amax=amax)
