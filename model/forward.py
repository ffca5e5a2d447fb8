"""The decoder stack and the jitted entry points `prefill` and `decode_step`.

prefill(params, cache, tokens[B, T], lengths[B]) runs the naive MLA form over right-padded prompts and writes
the latent cache; decode_step(params, cache, tokens[B]) runs the absorbed form against it. Both are pure: the
cache goes in and a new one comes out (the input buffer is donated, so XLA updates it in place).
Host-side checks (token ids, lengths, capacity) run before anything is traced or compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import Cache, kv_load, kv_store
from model.config import Config
from model.layers import F32, rms_norm, rows_dot, swiglu
from model.mla import attend_absorbed, attend_naive, causal_mask, project, write_cache
from model.moe import moe, moe_train
from model.params import Layer, Moe, Params, Transposed


def block(p: Layer, x, positions, cache_c, cache_r, cfg: Config, *, decode: bool, moe_impl: str = "auto",
          layer=None, train: bool = False, mesh=None, kv_scale=None, backend: str = "xla", segments=None,
          tp_axis: str | None = None, read_first: bool = False):
    """One decoder layer. x: [B, T, D]; positions: [B, T]; cache_c: [B, S, C]; cache_r: [B, S, R] (or None).

    Prefill (decode=False) writes the new latents at offset 0 and attends in the naive form among the T tokens;
    decode writes them at each sequence's position and attends in the absorbed form against the cache. Without
    a cache (training) nothing is written. layer: for MoE layers inside the scan, the layer index into whole
    [L, E, ...] expert stacks. train: differentiable experts, and the MoE's (load, balance) stats are returned.
    kv_scale: [2] this layer's (c_kv, k_pe) scales when the cache is FP8. backend: "xla" or "pallas" (attention
    and routed experts through pallas_kernels/). segments: [B, T] document ids of packed training rows (no cache):
    a token attends only to earlier tokens of its own document. tp_axis: inside sharding/tp.py's shard_map, the
    mesh axis over which the attention output and the FFN output are partial sums (psum'd here) and the
    down-projections' column slices are gathered (mla.project). read_first:
    decode (xla backend) attends to the cache as it was plus this step's latents, then writes them (the
    unrolled layers of the unstacked layout, whose per-layer buffers XLA:CPU otherwise copies every step).
    Returns (x, cache_c, cache_r, stats or None).
    """
    h = rms_norm(x, p.attn_norm, cfg.rms_norm_eps)
    q_nope, q_pe, c_kv, k_pe = project(p.attn, h, positions, cfg, tp_axis)
    start = positions[:, 0]
    sc, sr = (None, None) if kv_scale is None else (kv_scale[0], kv_scale[1])
    read_first = read_first and decode and backend == "xla"
    if cache_c is not None and not read_first:
        cache_c = write_cache(cache_c, kv_store(c_kv, sc), start)
        cache_r = write_cache(cache_r, kv_store(k_pe, sr), start)
    if decode and backend == "pallas":
        a = attend_absorbed(p.attn, q_nope, q_pe, cache_c, cache_r, None, cfg.softmax_scale, backend,
                            lengths=positions[:, 0] + 1, kv_scale=kv_scale)
    elif decode:
        # The cache as it was (slots before this step) and this step's latents as the cache will hold them, in
        # one softmax; the write follows and depends on the result (+ 0 * a). Written first and read after, a
        # batch-1 cache buffer was copied (and the write done twice) every layer and step by XLA:CPU.
        old = jnp.broadcast_to(jnp.arange(cache_c.shape[1])[None, None, :] < start[:, None, None],
                               (x.shape[0], x.shape[1], cache_c.shape[1]))
        new_c, new_r = kv_store(c_kv, sc), kv_store(k_pe, sr)
        a = attend_absorbed(p.attn, q_nope, q_pe, kv_load(cache_c, sc, x.dtype), kv_load(cache_r, sr, x.dtype), old,
                            cfg.softmax_scale, new=(kv_load(new_c, sc, x.dtype), kv_load(new_r, sr, x.dtype)))
        after = 0 * a[..., :1]
        cache_c = write_cache(cache_c, kv_store(c_kv + after, sc), start)
        cache_r = write_cache(cache_r, kv_store(k_pe + after, sr), start)
    else:
        mask = causal_mask(x.shape[1])
        if segments is not None:
            if backend != "xla":
                raise ValueError("packed documents (segments) are supported by the xla backend only")
            mask = mask & (segments[:, :, None] == segments[:, None, :])
        a = attend_naive(p.attn, q_nope, q_pe, c_kv, k_pe, mask, cfg.softmax_scale, backend)
    if tp_axis is not None:
        a = jax.lax.psum(a, tp_axis)
    x = x + a
    h = rms_norm(x, p.ffn_norm, cfg.rms_norm_eps)
    stats = None
    with jax.named_scope("ffn"):
        if not isinstance(p.ffn, Moe):
            f = swiglu(p.ffn, h)
        elif train:
            f, stats = moe_train(p.ffn, h, cfg, layer=layer)
        else:
            f = moe(p.ffn, h, cfg, impl="pallas" if backend == "pallas" else moe_impl, layer=layer, mesh=mesh)
    if tp_axis is not None:
        f = jax.lax.psum(f, tp_axis)
    return x + f, cache_c, cache_r, stats


def _run_stack(stack: Layer, x, positions, cache_c, cache_r, cfg: Config, decode: bool, moe_impl: str,
               train: bool = False, mesh=None, kv_scale=None, backend: str = "xla", segments=None):
    """lax.scan over a stack of layers. MoE expert stacks are not scanned but closed over whole and indexed by
    layer (see moe._expert_view), so a step reads only the experts it routes to."""
    experts = None
    if isinstance(stack.ffn, Moe):
        experts = (stack.ffn.we1, stack.ffn.we3, stack.ffn.we2)
        stack = stack.replace(ffn=stack.ffn.replace(we1=None, we3=None, we2=None))

    def step(x, xs):
        layer, idx, cc, cr, ks = xs
        if experts is not None:
            we1, we3, we2 = experts
            layer = layer.replace(ffn=layer.ffn.replace(we1=we1, we3=we3, we2=we2))
        x, cc, cr, stats = block(layer, x, positions, cc, cr, cfg, decode=decode, moe_impl=moe_impl,
                                 layer=idx if experts is not None else None, train=train, mesh=mesh, kv_scale=ks,
                                 backend=backend, segments=segments)
        return x, (cc, cr, stats)
    n = stack.attn_norm.shape[0]
    x, (cache_c, cache_r, stats) = jax.lax.scan(step, x, (stack, jnp.arange(n), cache_c, cache_r, kv_scale))
    return x, cache_c, cache_r, stats


def forward(params: Params, cache: Cache | None, tokens, positions, cfg: Config, *, decode: bool,
            moe_impl: str = "auto", train: bool = False, mesh=None, backend: str = "xla", segments=None,
            tp_axis: str | None = None):
    """Embed, all layers, final norm. tokens/positions: [B, T]; segments: [B, T] document ids of packed rows
    (training without a cache only); tp_axis: see `block` (unstacked layers only).

    Returns (hidden [B, T, D] after the final RMSNorm, new c_kv [L, B, S, C], new k_pe [L, B, S, R], or tuples
    of per-layer buffers for a per-layer cache); with
    train=True (no cache) returns (hidden, (load [Lm, E], balance [Lm])) instead.
    """
    x = params.embed[tokens]  # [B, T, D]
    n_dense = cfg.first_k_dense_replace
    c_kv, k_pe = (cache.c_kv, cache.k_pe) if cache is not None else (None, None)
    stats = None
    for stack, lo, hi in ((params.dense_layers, 0, n_dense), (params.moe_layers, n_dense, cfg.num_hidden_layers)):
        if stack is None:
            continue
        with jax.named_scope("dense_layers" if lo == 0 else "moe_layers"):
            if isinstance(stack, tuple):  # one buffer per layer (model/layout.py): an unrolled loop, no scan
                if train or mesh is not None:
                    raise ValueError("unstacked layers are for inference, on one device or tensor-parallel "
                                     "through prefill_fn / decode_fn (sharding/tp.py); no training")
                # A per-layer cache (model/cache.py) is updated in place layer by layer. A stacked one has each
                # layer taken out once and the stack rebuilt once (updating the [L, ...] buffer layer by layer
                # made XLA copy all of it after every layer), still a copy of the cache per step.
                ccs = [None if cache is None else c_kv[j] for j in range(lo, hi)]
                crs = [None if cache is None else k_pe[j] for j in range(lo, hi)]
                for j, layer in enumerate(stack):
                    ks = None if cache is None or cache.kv_scale is None else cache.kv_scale[lo + j]
                    x, ccs[j], crs[j], _ = block(layer, x, positions, ccs[j], crs[j], cfg, decode=decode,
                                                 moe_impl=moe_impl, kv_scale=ks, backend=backend,
                                                 segments=segments, tp_axis=tp_axis, read_first=True)
                if cache is not None and cache.per_layer:
                    c_kv, k_pe = c_kv[:lo] + tuple(ccs) + c_kv[hi:], k_pe[:lo] + tuple(crs) + k_pe[hi:]
                elif cache is not None:
                    c_kv = jax.lax.dynamic_update_slice_in_dim(c_kv, jnp.stack(ccs), lo, 0)
                    k_pe = jax.lax.dynamic_update_slice_in_dim(k_pe, jnp.stack(crs), lo, 0)
                continue
            if tp_axis is not None:
                raise ValueError("tensor-parallel layers (tp_axis) need the unstacked layout (model/layout.py)")
            if cache is not None and cache.per_layer:
                raise ValueError("a per-layer cache goes with unstacked weights (model.layout.unstack_layers); "
                                 "stacked weights take a stacked cache (model.cache.to_stacked)")
            if cache is None:
                x, _, _, st = _run_stack(stack, x, positions, None, None, cfg, decode, moe_impl, train,
                                         backend=backend, segments=segments)
                stats = st if st is not None else stats
                continue
            x, cc, cr, _ = _run_stack(stack, x, positions, c_kv[lo:hi], k_pe[lo:hi], cfg, decode, moe_impl,
                                      mesh=mesh, kv_scale=None if cache.kv_scale is None else cache.kv_scale[lo:hi],
                                      backend=backend)
        # written back into the full buffers (in place when the cache is donated)
        c_kv, k_pe = c_kv.at[lo:hi].set(cc), k_pe.at[lo:hi].set(cr)
    hidden = rms_norm(x, params.norm, cfg.rms_norm_eps)
    if cache is None:
        return hidden, stats
    return hidden, c_kv, k_pe


def lm_logits(params: Params, hidden) -> jax.Array:
    """[..., D] -> [..., V] float32."""
    if isinstance(params.lm_head, Transposed):  # the unstacked layout's [V, D] head
        return rows_dot(params.lm_head.t, hidden)
    return jnp.einsum("...D,DV->...V", hidden, params.lm_head, preferred_element_type=F32)


def _unstacked_on_mesh(params, mesh) -> bool:
    from model.layout import is_unstacked
    return mesh is not None and is_unstacked(params)


def prefill_fn(params, cache, tokens, lengths, cfg, all_logits=False, moe_impl="auto", mesh=None, backend="xla",
               tp_axis=None):
    """Unjitted prefill (see `prefill`). Unstacked params with a mesh run tensor-parallel (sharding/tp.py)."""
    if _unstacked_on_mesh(params, mesh):
        from sharding.tp import tensor_parallel
        fn = lambda p, c, tk, ln, tp_axis: prefill_fn(p, c, tk, ln, cfg, all_logits, moe_impl,  # noqa: E731
                                                      backend=backend, tp_axis=tp_axis)
        return tensor_parallel(fn, params, cache, tokens, lengths, cfg=cfg, mesh=mesh)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, c_kv, k_pe = forward(params, cache, tokens, positions, cfg, decode=False, moe_impl=moe_impl, mesh=mesh,
                                 backend=backend, tp_axis=tp_axis)
    new_cache = Cache(c_kv=c_kv, k_pe=k_pe, lengths=lengths.astype(jnp.int32), kv_scale=cache.kv_scale)
    if all_logits:
        return lm_logits(params, hidden), new_cache
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    return lm_logits(params, last), new_cache


def decode_fn(params, cache, tokens, cfg, moe_impl="auto", mesh=None, backend="xla", tp_axis=None):
    """Unjitted decode step (see `decode_step`). Unstacked params with a mesh run tensor-parallel (sharding/tp.py).
    tp_axis: inside that shard_map, the axis whose partial sums each layer reduces."""
    if _unstacked_on_mesh(params, mesh):
        from sharding.tp import tensor_parallel
        fn = lambda p, c, tk, tp_axis: decode_fn(p, c, tk, cfg, moe_impl, backend=backend,  # noqa: E731
                                                 tp_axis=tp_axis)
        return tensor_parallel(fn, params, cache, tokens, cfg=cfg, mesh=mesh)
    positions = cache.lengths[:, None]  # [B, 1]
    hidden, c_kv, k_pe = forward(params, cache, tokens[:, None], positions, cfg, decode=True, moe_impl=moe_impl,
                                 mesh=mesh, backend=backend, tp_axis=tp_axis)
    return lm_logits(params, hidden[:, 0]), Cache(c_kv=c_kv, k_pe=k_pe, lengths=cache.lengths + 1,
                                                 kv_scale=cache.kv_scale)


_prefill = jax.jit(prefill_fn, static_argnames=("cfg", "all_logits", "moe_impl", "mesh", "backend"),
                   donate_argnames=("cache",))
_decode = jax.jit(decode_fn, static_argnames=("cfg", "moe_impl", "mesh", "backend"), donate_argnames=("cache",))
BACKENDS = ("xla", "pallas")


def check_backend(backend: str, mesh=None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "pallas" and mesh is not None:
        raise ValueError("the pallas backend runs on one device; use backend='xla' with a mesh")


def check_tokens(cfg: Config, tokens, what: str = "token ids") -> np.ndarray:
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
        raise ValueError(f"{what} out of the vocabulary [0, {cfg.vocab_size}): {bad[:8].tolist()}")
    return arr


def prefill(params: Params, cache: Cache, tokens, lengths, *, cfg: Config, all_logits: bool = False,
            moe_impl: str = "auto", mesh=None, backend: str = "xla"):
    """Run right-padded prompts through the model and fill the (empty) cache.

    Args: tokens: [B, T] int, prompt b in tokens[b, :lengths[b]] (the rest is padding, any valid id);
      lengths: [B] int, 1 <= lengths[b] <= T <= cache.max_len. The cache is donated.
    backend: "xla" (plain XLA) or "pallas" (pallas_kernels/: compiled on GPU, interpret mode elsewhere).
    Returns: logits [B, V] float32 at each prompt's last token ([B, T, V] if all_logits), and the new cache.
    """
    check_backend(backend, mesh)
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
    if mesh is not None:
        from sharding.rules import check_divisible
        check_divisible(cfg, mesh, batch=tok.shape[0])
    return _prefill(params, cache, jnp.asarray(tok, jnp.int32), jnp.asarray(lens, jnp.int32), cfg=cfg,
                    all_logits=all_logits, moe_impl=moe_impl, mesh=mesh, backend=backend)


def decode_step(params: Params, cache: Cache, tokens, *, cfg: Config, moe_impl: str = "auto", check: bool = True,
                mesh=None, backend: str = "xla"):
    """One token per sequence through the absorbed-attention path. tokens: [B]. The cache is donated.

    Returns logits [B, V] float32 and the cache with each length advanced by one. With check=True the token ids
    and the cache capacity are verified on the host first (a small device->host read of the lengths).
    """
    check_backend(backend, mesh)
    if check:
        tok = check_tokens(cfg, tokens)
        if tok.shape != (cache.batch,):
            raise ValueError(f"tokens must be [B]={cache.batch}, got shape {tok.shape}")
        if int(np.max(np.asarray(cache.lengths))) >= cache.max_len:
            raise ValueError(f"the cache is full ({cache.max_len} tokens); allocate a longer one")
    return _decode(params, cache, jnp.asarray(tokens, jnp.int32), cfg=cfg, moe_impl=moe_impl, mesh=mesh,
                   backend=backend)
