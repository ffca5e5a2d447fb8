"""The decoder stack and the jitted entry points `prefill` and `decode_step`.

prefill(params, cache, tokens[B, T], lengths[B]) runs the naive MLA form over right-padded prompts and writes
the latent cache; decode_step(params, cache, tokens[B]) writes one token per sequence and runs the absorbed form
against the cache. Both are pure: the cache goes in and a new one comes out (the input buffer is donated, so XLA
updates it in place). How they run (attention and expert implementations, mesh) is an `ExecutionPlan`; the phase
is set here. Host-side checks (token ids, lengths, capacity, the plan, the mesh) run before anything is traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import Cache, kv_store, layer_view
from model.config import Config
from model.layers import F32, rms_norm, swiglu
from model.mla import attend_absorbed, attend_naive, causal_mask, project, write_cache
from model.moe import moe
from model.params import Layer, Moe, Params
from model.placement import check_divisible
from model.plan import ExecutionPlan


def block(p: Layer, x, cache: Cache | None, positions, segments, cfg: Config, plan: ExecutionPlan, phase: str,
          rope_offset: int = 0, routing: bool = False, layer=0):
    """One decoder layer. x: [B, T, D]; cache: the whole stack's cache (c_kv [L, B, S, C], k_pe [L, B, S, R],
    kv_scale [L, 2] when FP8) of which this is layer `layer` (an int or a traced index), or None (training:
    nothing written); positions: [B, T]; segments: [B, T] document ids of packed training rows (a token attends
    only to earlier tokens of its own document) or None.

    The new latents are written into the stack's buffers in place (a scatter at this layer, each sequence's
    position), so a step moves the T new entries, not the cache. prefill / train: written at offset 0, attention
    runs in the naive form among the T tokens; decode: written at each sequence's position, attention runs in the
    absorbed form against this layer's slice. Returns (x, cache, stats): stats = (load [E], balance term) of a MoE
    layer in the train phase, its `Routed` with routing=True (model/routing.py), else None.
    rope_offset: RoPE rotates at positions + rope_offset, the cache slots stay `positions` (the MTP layer runs one
    position ahead of the slot it writes, model/mtp.py).
    """
    h = rms_norm(x, p.attn_norm, cfg.rms_norm_eps)
    q_nope, q_pe, c_kv, k_pe = project(p.attn, h, positions + rope_offset, cfg)
    if cache is not None:
        start = positions[:, 0] if phase == "decode" else jnp.zeros_like(positions[:, 0])
        scale = None if cache.kv_scale is None else cache.kv_scale[layer]
        cache = cache.replace(c_kv=write_cache(cache.c_kv, kv_store(c_kv, scale, 0), layer, start),
                              k_pe=write_cache(cache.k_pe, kv_store(k_pe, scale, 1), layer, start))
    if phase == "decode":
        a = attend_absorbed(p.attn, q_nope, q_pe, layer_view(cache, layer), positions, cfg, plan)
    else:
        mask = causal_mask(x.shape[1])
        if segments is not None:
            mask = mask & (segments[:, :, None] == segments[:, None, :])
        a = attend_naive(p.attn, q_nope, q_pe, c_kv, k_pe, mask, cfg, plan)
    x = x + a
    h = rms_norm(x, p.ffn_norm, cfg.rms_norm_eps)
    with jax.named_scope("ffn"):
        f, stats = moe(p.ffn, h, cfg, plan, phase, routing) if isinstance(p.ffn, Moe) else (swiglu(p.ffn, h), None)
    return x + f, cache, stats


def _run_stack(stack: Layer, x, cache, first: int, positions, segments, cfg, plan, phase, routing):
    """lax.scan over a stack of layers, the model's layers first, first + 1, ...; cache: the whole model's (its
    buffers carried through the scan and written in place) or None. MoE expert stacks are not scanned but closed
    over whole and indexed by layer (model/moe.py, ExpertView), so a step reads only the experts it routes to.
    Returns (x, the cache, stats)."""
    experts = None
    if isinstance(stack.ffn, Moe):
        experts = (stack.ffn.we1, stack.ffn.we3, stack.ffn.we2)
        stack = stack.replace(ffn=stack.ffn.replace(we1=None, we3=None, we2=None))

    def step(carry, xs):
        x, cache = carry
        layer, idx = xs
        if experts is not None:
            layer = layer.replace(ffn=layer.ffn.replace(we1=experts[0], we3=experts[1], we2=experts[2], layer=idx))
        x, cache, stats = block(layer, x, cache, positions, segments, cfg, plan, phase, routing=routing,
                                layer=first + idx)
        return (x, cache), stats

    n = stack.attn_norm.shape[0]
    (x, cache), stats = jax.lax.scan(step, (x, cache), (stack, jnp.arange(n)))
    return x, cache, stats


def forward(params: Params, cache: Cache | None, tokens, positions, segments, cfg: Config, plan: ExecutionPlan,
            phase: str, routing: bool = False):
    """Embed, all layers, final norm. tokens/positions: [B, T]; segments: [B, T] document ids of packed rows
    (training only) or None. Returns (hidden [B, T, D] after the final RMSNorm, the new cache (None without
    one), stats: (load [Lm, E], balance [Lm]) in the train phase, the MoE layers' `Routed` ([Lm, B, T, X]) with
    routing=True, else None)."""
    x = params.embed[tokens]  # [B, T, D]
    n_dense = cfg.first_k_dense_replace
    stats = None
    for stack, first in ((params.dense_layers, 0), (params.moe_layers, n_dense)):
        if stack is None:
            continue
        with jax.named_scope("dense_layers" if first == 0 else "moe_layers"):
            x, cache, st = _run_stack(stack, x, cache, first, positions, segments, cfg, plan, phase, routing)
        stats = st if st is not None else stats
    return rms_norm(x, params.norm, cfg.rms_norm_eps), cache, stats


def lm_logits(params: Params, hidden, cfg: Config) -> jax.Array:
    """[..., D] -> [..., V] float32. A head padded past the vocabulary on a mesh (model/placement.py) is sliced
    back, so padded ids are never scored or sampled."""
    logits = jnp.einsum("...D,DV->...V", hidden, params.lm_head, preferred_element_type=F32)
    return logits[..., :cfg.vocab_size]


def prefill_fn(params, cache, tokens, lengths, cfg, plan, all_logits=False, routing=False):
    """Unjitted prefill (see `prefill`)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, cache, routed = forward(params, cache, tokens, positions, None, cfg, plan, "prefill", routing)
    cache = cache.replace(lengths=lengths.astype(jnp.int32))
    if all_logits:
        logits = lm_logits(params, hidden, cfg)
    else:
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
        logits = lm_logits(params, last, cfg)
    return (logits, cache, routed) if routing else (logits, cache)


def decode_fn(params, cache, tokens, cfg, plan, routing=False):
    """Unjitted decode step (see `decode_step`)."""
    positions = cache.lengths[:, None]  # [B, 1]
    hidden, cache, routed = forward(params, cache, tokens[:, None], positions, None, cfg, plan, "decode", routing)
    out = lm_logits(params, hidden[:, 0], cfg), cache.replace(lengths=cache.lengths + 1)
    return (*out, routed) if routing else out


_prefill = jax.jit(prefill_fn, static_argnames=("cfg", "plan", "all_logits", "routing"), donate_argnames=("cache",))
_decode = jax.jit(decode_fn, static_argnames=("cfg", "plan", "routing"), donate_argnames=("cache",))


def check_tokens(cfg: Config, tokens, what: str = "token ids") -> np.ndarray:
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
        raise ValueError(f"{what} out of the vocabulary [0, {cfg.vocab_size}): {bad[:8].tolist()}")
    return arr


def prefill(params: Params, cache: Cache, tokens, lengths, *, cfg: Config, all_logits: bool = False,
            routing: bool = False, plan: ExecutionPlan | None = None, backend: str | None = None, mesh=None):
    """Run right-padded prompts through the model and fill the (empty) cache.

    Args: tokens: [B, T] int, prompt b in tokens[b, :lengths[b]] (the rest is padding, any valid id);
      lengths: [B] int, 1 <= lengths[b] <= T <= cache.max_len. The cache is donated.
    plan: an ExecutionPlan; or, for short, backend ("xla", or "pallas": pallas_kernels/, compiled on GPU,
      interpret mode elsewhere) and mesh (parameters and cache placed with model.shard_params / shard_cache).
    Returns: logits [B, V] float32 at each prompt's last token ([B, T, V] if all_logits), and the new cache; with
    routing=True also the router's choice in every MoE layer, a `model.routing.Routed` ([Lm, B, T, X]; count it
    with routing_stats(routed, cfg, token_mask(lengths, T))). The logits are the same either way.
    """
    plan = ExecutionPlan.build(plan, backend=backend, mesh=mesh)
    tok = check_tokens(cfg, tokens)
    lens = np.asarray(lengths)
    if tok.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tok.shape}")
    if lens.shape != (tok.shape[0],):
        raise ValueError(f"lengths must be [B]={tok.shape[0]}, got shape {lens.shape}")
    if tok.shape[0] != cache.batch:
        raise ValueError(f"batch {tok.shape[0]} does not match the cache's batch {cache.batch}")
    if lens.size and lens.min() < 1:
        raise ValueError(f"empty prompt: lengths must be >= 1, got {lens.tolist()}")
    if lens.size and lens.max() > tok.shape[1]:
        raise ValueError(f"lengths {lens.tolist()} exceed the padded prompt length T={tok.shape[1]}")
    if tok.shape[1] > cache.max_len:
        raise ValueError(f"prompt of {tok.shape[1]} tokens is longer than the cache ({cache.max_len} tokens)")
    plan.check("prefill", tokens=tok.size)
    if plan.mesh is not None:
        check_divisible(cfg, plan.mesh, plan.rules, batch=tok.shape[0])
    return _prefill(params, cache, jnp.asarray(tok, jnp.int32), jnp.asarray(lens, jnp.int32), cfg=cfg, plan=plan,
                    all_logits=all_logits, routing=routing)


def decode_step(params: Params, cache: Cache, tokens, *, cfg: Config, check: bool = True, routing: bool = False,
                plan: ExecutionPlan | None = None, backend: str | None = None, mesh=None):
    """One token per sequence through the absorbed-attention path. tokens: [B]. The cache is donated.

    Returns logits [B, V] float32 and the cache with each length advanced by one (and with routing=True the
    router's choice, a `Routed` [Lm, B, 1, X], as for `prefill`). With check=True the token ids
    and the cache capacity (and its span, when it has one: `Cache.span`) are verified on the host first (a small
    device->host read of the lengths).
    plan / backend / mesh: as for `prefill`.
    """
    plan = ExecutionPlan.build(plan, backend=backend, mesh=mesh)
    if check:
        tok = check_tokens(cfg, tokens)
        if tok.shape != (cache.batch,):
            raise ValueError(f"tokens must be [B]={cache.batch}, got shape {tok.shape}")
        n = int(np.max(np.asarray(cache.lengths)))
        if n >= cache.max_len:
            raise ValueError(f"the cache is full ({cache.max_len} tokens); allocate a longer one")
        if cache.span is not None and not n < cache.span <= cache.max_len:
            raise ValueError(f"the cache's span {cache.span} must hold position {n}, which this step reads, and lie "
                             f"within the cache ({cache.max_len} positions)")
    plan.check("decode", tokens=cache.batch)
    if plan.attention == "pallas" and cache.max_len % 16:
        raise ValueError(f"the pallas decode kernel reads the cache in tiles of 16 positions: allocate a cache "
                         f"length that is a multiple of 16, not {cache.max_len}")
    if plan.mesh is not None:
        check_divisible(cfg, plan.mesh, plan.rules, batch=cache.batch)
    return _decode(params, cache, jnp.asarray(tokens, jnp.int32), cfg=cfg, plan=plan, routing=routing)
