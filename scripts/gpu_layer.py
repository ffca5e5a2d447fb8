"""The model-level stages of scripts/gpu_check.py: one DeepSeek-V3 MoE layer at real sizes (random weights;
routed experts in BF16, FP8 or NVFP4), decode and prefill on each backend against its floor, and whole models
generating. The per-layer times are what a roofline of the serving path is calibrated on.

Floor of a layer step: max(bytes / copy bandwidth, FLOPs / bf16 matmul rate) with bytes = every non-expert weight,
the routed experts a step touches (decode: the expected distinct count E (1 - (1 - X/E)^B) under uniform
routing, which random weights approximate; prefill of 4k tokens: all of them) and the latent cache read; FLOPs =
2 per multiply-add of every weight a token uses plus the attention products.
"""

from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import Cache
from model.config import R1_671B, RopeScaling
from model.forward import block
from model.params import Moe, abstract_params
from model.plan import ExecutionPlan
from pallas_kernels import arg_specs
from pallas_kernels import bench as kb


def layer_config(dry: bool):
    """DeepSeek-V3 with one MoE layer in bf16; a dry run's is float32 (XLA:CPU has no bf16 x bf16 -> f32 dot)
    with every dimension small but a multiple of the FP8 128-tile."""
    cfg = R1_671B.replace(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)
    if dry:
        cfg = cfg.replace(vocab_size=512, hidden_size=256, moe_intermediate_size=128, num_attention_heads=4,
                          q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                          n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                          rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=128),
                          max_position_embeddings=1024, dtype="float32")
    return cfg


def random_layer(cfg, fmt: str, key):
    """One MoE layer (not stacked) of random weights at 1/sqrt(fan-in); norms 1, router bias 0; routed experts
    as `fmt` (random valid codes for the quantized formats: no bf16 copy is ever made)."""
    spec = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), abstract_params(cfg).moe_layers)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(spec)
    out = []
    for i, (path, s) in enumerate(leaves):
        name, k = jax.tree_util.keystr(path), jax.random.fold_in(key, i)
        if "norm" in name:
            out.append(jnp.ones(s.shape, s.dtype))
        elif "e_bias" in name:
            out.append(jnp.zeros(s.shape, s.dtype))
        elif ".we" in name:
            out.append(None)  # below
        else:
            out.append(kb.random_weight(k, s, scale=1 / math.sqrt(s.shape[-2] if s.ndim > 1 else 1)))
    layer = treedef.unflatten(out)
    d, m, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    we = {}
    for j, (name, down) in enumerate((("we1", False), ("we3", False), ("we2", True))):
        w_spec = arg_specs.expert_weights(fmt, experts=e, hidden=d, width=m, down=down, dtype=cfg.param_dtype)
        we[name] = kb.random_weight(jax.random.fold_in(key, 1000 + j), w_spec, scale=1 / math.sqrt(m if down else d))
    return layer.replace(ffn=layer.ffn.replace(**we))


def _nbytes(tree) -> float:
    return float(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def layer_floor(cfg, layer, batch: int, context: int, meters, prefill: bool):
    """(bytes, FLOPs) of one layer step (see the module docstring)."""
    d, m, e, x = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    n, c, r, h, v = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim,
                     cfg.v_head_dim)
    ffn: Moe = layer.ffn
    experts = _nbytes((ffn.we1, ffn.we3, ffn.we2))
    fixed_bytes = _nbytes(layer) - experts
    fixed_params = sum(a.size for a in jax.tree.leaves(layer.replace(ffn=ffn.replace(we1=None, we3=None, we2=None))))
    tokens = batch * (context if prefill else 1)
    used = e if prefill else e * (1 - (1 - x / e) ** batch)
    nbytes = fixed_bytes + experts * used / e + (0 if prefill else batch * context * (c + r) * 2)
    flops = 2.0 * tokens * (fixed_params + x * 3 * d * m)
    if prefill:
        flops += 2.0 * batch * n * context * (context + 1) / 2 * (h + r + v)
    else:
        flops += 2.0 * batch * n * context * (2 * c + r)
    return nbytes, flops


def _time_step(f, layer, x, pos, cc, cr, repeats: int) -> float:
    """Median seconds per call of a step that donates its cache and gets it back."""
    for _ in range(2):
        y, cc, cr = f(layer, x, pos, cc, cr)
    jax.block_until_ready(y)
    t0 = time.perf_counter()
    y, cc, cr = f(layer, x, pos, cc, cr)
    jax.block_until_ready(y)
    calls = int(min(200, max(1, 0.02 / max(time.perf_counter() - t0, 1e-7))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            y, cc, cr = f(layer, x, pos, cc, cr)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def layer_rows(dry: bool, meters, repeats: int = 5):
    """(case, thunk) pairs: each expert precision x backend x (decode at batch 1, 32, 128; prefill)."""
    if meters is None:
        raise RuntimeError("the meters stage did not run: no roofline to compare with")
    cfg = layer_config(dry)
    context = 32 if dry else 4096
    batches = (1,) if dry else (1, 32, 128)
    dt = cfg.param_dtype
    c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    for fmt in ("bf16", "fp8", "nvfp4"):
        layer = random_layer(cfg, fmt, jax.random.key(0))
        for backend in ("xla", "pallas"):
            plan = ExecutionPlan.build(backend=backend)

            def step(layer, x, pos, cc, cr, decode, plan=plan):
                cache = Cache(c_kv=cc, k_pe=cr, lengths=pos[:, -1] + 1)
                y, cache, _ = block(layer, x, cache, pos, None, cfg, plan, "decode" if decode else "prefill")
                return y, cache.c_kv, cache.k_pe
            dec = jax.jit(lambda *a, step=step: step(*a, decode=True), donate_argnums=(3, 4))
            pre = jax.jit(lambda *a, step=step: step(*a, decode=False), donate_argnums=(3, 4))
            for b in (*batches, "prefill"):
                prefill = b == "prefill"
                bb = 1 if prefill else b

                def thunk(bb=bb, prefill=prefill, fmt=fmt, backend=backend, dec=dec, pre=pre, layer=layer):
                    k = jax.random.key(bb)
                    t = context if prefill else 1
                    x = jax.random.normal(k, (bb, t, cfg.hidden_size), jnp.float32).astype(dt)
                    pos = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (bb, t)) if prefill
                           else jnp.full((bb, 1), context - 1, jnp.int32))
                    cc = jax.random.normal(k, (1, bb, context, c), jnp.float32).astype(dt)  # a one-layer stack
                    cr = jax.random.normal(k, (1, bb, context, r), jnp.float32).astype(dt)
                    secs = _time_step(pre if prefill else dec, layer, x, pos, cc, cr, repeats)
                    nbytes, flops = layer_floor(cfg, layer, bb, context, meters, prefill)
                    floor = kb.floor_seconds(nbytes, flops, *meters)
                    return {"experts": fmt, "backend": backend, "phase": "prefill" if prefill else "decode",
                            "batch": bb, "context": context, "ms": secs * 1e3, "floor_ms": floor * 1e3,
                            "pct_of_floor": 100 * floor / secs, "gb": nbytes / 1e9, "gflop": flops / 1e9}
                yield f"layer {fmt} {backend} {'prefill' if prefill else f'decode batch {b}'}", thunk
        del layer


def model_rows(dry: bool):
    """(case, thunk) pairs: `small` in bf16 (random weights; `tiny` in a dry run) and the bundled model, each
    generating on both backends (a dry run: `tiny` on pallas, the bundled model on xla); tokens/s of the whole
    generate call after it has compiled."""
    from model import SMALL, TINY, generate, init
    from model.cli import BUNDLED_CHECKPOINT
    from model.io.checkpoint import load_checkpoint

    prompt, new = (16, 4) if dry else (128, 64)
    small_cfg = TINY if dry else SMALL.replace(dtype="bfloat16")  # XLA:CPU has no bf16 x bf16 -> f32 dot
    models = [("tiny" if dry else "small bf16", lambda: (init(small_cfg, jax.random.key(0), std="fan_in"),
                                                         small_cfg)),
              ("bundled", lambda: load_checkpoint(BUNDLED_CHECKPOINT)[:2])]
    for i, (name, load) in enumerate(models):
        params, cfg = load()
        # a dry run takes each model and each backend once (interpret mode compiles slowly: the smaller model takes
        # pallas), the GPU every pair
        for backend in ("pallas", "xla")[i:i + 1] if dry else ("xla", "pallas"):
            for b in ((1,) if dry else (1, 32)):
                def thunk(b=b, backend=backend, params=params, cfg=cfg):
                    prompts = np.random.default_rng(b).integers(0, cfg.vocab_size, (b, prompt)).tolist()
                    def run():
                        return generate(params, cfg, prompts, max_new_tokens=new, backend=backend)
                    run()
                    t0 = time.perf_counter()
                    out = run()
                    secs = time.perf_counter() - t0
                    n_new = int(out.num_generated.sum())
                    return {"backend": backend, "batch": b, "prompt": prompt, "new_tokens": n_new, "seconds": secs,
                            "tokens_per_s": n_new / secs}
                yield f"{name} {backend} batch {b}", thunk
