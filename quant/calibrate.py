"""Post-training calibration: the per-tensor activation amax of every linear's input (static NVFP4 activation
scales, as the published recipe stores `input_scale = amax / (6 * 448)`), and the latent cache's per-layer amax
(FP8 cache scales).

Every candidate weight is replaced by a `Probe` (the weight itself, plus ids) and the model runs prefill over the
calibration sequences with the gather expert path, so each routed expert sees exactly the tokens routed to it;
each probed activation reports its amax through a host callback. Experts that no calibration token reached take
the largest input amax of their layer. A margin (default 2x) is applied: under-estimating the amax saturates the
block scales at run time, over-estimating it costs almost nothing (see docs/quantization.md).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import init_cache
from model.config import Config
from model.forward import prefill
from model.params import Params
from quant import formats as F
from quant import qarray
from quant.qarray import Probe
from quant.recipes import ATTN_K_AXIS


def _probed(params: Params):
    """(params with Probes in place of every quantizable linear, {key: ids array})."""
    counter = itertools.count(1)
    keys = {}

    def probe(w, key, batch_shape):
        n = int(np.prod(batch_shape))
        start = next(counter) * 100000  # disjoint id ranges per key
        ids = (start + np.arange(n)).reshape(batch_shape).astype(np.float32)
        keys[key] = ids
        return Probe(w, jnp.asarray(ids))

    out = params
    if params.dense_layers is not None:
        m = params.dense_layers.ffn
        ld = m.w1.shape[0]
        out = out.replace(dense_layers=out.dense_layers.replace(ffn=m.replace(
            w1=probe(m.w1, ("dense_mlp", "in"), (ld,)), w2=probe(m.w2, ("dense_mlp", "hid"), (ld,)))))
    if params.moe_layers is not None:
        moe = out.moe_layers.ffn
        lm, e = moe.we1.shape[:2]
        moe = moe.replace(we1=probe(moe.we1, ("routed", "in"), (lm, e)), we2=probe(moe.we2, ("routed", "hid"), (lm, e)),
                          shared=moe.shared.replace(w1=probe(moe.shared.w1, ("shared", "in"), (lm,)),
                                                    w2=probe(moe.shared.w2, ("shared", "hid"), (lm,))))
        out = out.replace(moe_layers=out.moe_layers.replace(ffn=moe))
    for stack in ("dense_layers", "moe_layers"):
        layer = getattr(out, stack)
        if layer is None:
            continue
        n = layer.attn_norm.shape[0]
        attn = layer.attn.replace(**{k: probe(getattr(layer.attn, k), (f"attn_{stack}", k), (n,))
                                     for k in ATTN_K_AXIS})
        out = out.replace(**{stack: layer.replace(attn=attn)})
    return out, keys


def calibrate(params: Params, cfg: Config, sequences, *, margin: float = 2.0) -> dict:
    """Run the calibration sequences (lists of token ids; each is run alone, batch 1) and return the static scales
    `quantize_params` takes: {"dense_mlp": (s_in [Ld], s_hid [Ld]), "shared": (...[Lm]), "routed": (s_in [Lm, E],
    s_hid [Lm, E]), "attn_<stack>": {name: [L]}, "kv": [L, 2] (c_kv, k_pe amax / 448)}, plus "amax" (raw)."""
    if not sequences:
        raise ValueError("calibration needs at least one sequence")
    # float32 whatever the serving dtype: amax barely depends on it, and XLA:CPU has no batched bf16 x bf16 -> f32
    # dot for the gather path
    params = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    cfg = dataclasses.replace(cfg, dtype="float32")
    probed, keys = _probed(params)
    seen: dict[float, float] = {}

    def sink(ids, amax):
        for i, a in zip(ids.reshape(-1).tolist(), np.broadcast_to(amax, ids.shape).reshape(-1).tolist()):
            seen[i] = max(seen.get(i, 0.0), a)

    kv_amax = np.zeros((cfg.num_hidden_layers, 2), np.float32)
    qarray._PROBE_SINK.append(sink)
    try:
        for seq in sequences:
            seq = np.asarray(seq, np.int32)[None]
            cache = init_cache(cfg, 1, seq.shape[1])
            _, cache = prefill(probed, cache, seq, np.array([seq.shape[1]]), cfg=cfg, moe_impl="gather")
            jax.effects_barrier()
            kv_amax = np.maximum(kv_amax, np.stack([np.abs(np.asarray(cache.c_kv, np.float32)).max((1, 2, 3)),
                                                    np.abs(np.asarray(cache.k_pe, np.float32)).max((1, 2, 3))], -1))
    finally:
        qarray._PROBE_SINK.pop()

    amax = {}
    for key, ids in keys.items():
        a = np.vectorize(lambda i: seen.get(float(i), np.nan))(ids).astype(np.float32)
        if key[0] == "routed":  # experts no token reached: the layer's largest
            a = np.where(np.isnan(a), np.nanmax(np.where(np.isnan(a), -np.inf, a), axis=1, keepdims=True), a)
        amax[key] = np.nan_to_num(a, nan=0.0)
    def to_scale(a):
        return jnp.asarray(F.nvfp4_tensor_scale(jnp.asarray(a * margin)))
    out = {"amax": {"/".join(k): v for k, v in amax.items()}}
    for group in ("dense_mlp", "shared", "routed"):
        if (group, "in") in amax:
            out[group] = (to_scale(amax[(group, "in")]), to_scale(amax[(group, "hid")]))
    for stack in ("dense_layers", "moe_layers"):
        if (f"attn_{stack}", "wq_a") in amax:
            out[f"attn_{stack}"] = {k: to_scale(amax[(f"attn_{stack}", k)]) for k in ATTN_K_AXIS}
    out["kv"] = jnp.asarray(np.where(kv_amax > 0, kv_amax * margin / F.E4M3_MAX, 1.0), jnp.float32)
    return out
