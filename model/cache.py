"""The latent KV cache: per layer and token only the normalised latent c_kv [C] and the rotated rope key [R].

Layout: c_kv [L, B, S, C], k_pe [L, B, S, R], lengths [B] (tokens already written per sequence). For the 671B
that is 61 x (512 + 64) values per token: 70,272 bytes in bf16, against ~5 MB for a full multi-head K/V cache.

Per-layer form (`per_layer=True`, `to_per_layer`): c_kv and k_pe as tuples of L arrays [B, S, C] / [B, S, R], for
the unstacked weight layout (model/layout.py), whose unrolled layers then update each buffer in place; a stacked
[L, ...] buffer would be sliced apart and rebuilt every step. The stacked layout (lax.scan) takes the stacked form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from model.config import Config


@struct.dataclass
class Cache:
    c_kv: jax.Array | tuple[jax.Array, ...]  # [L, B, S, C], or per layer: L x [B, S, C]
    k_pe: jax.Array | tuple[jax.Array, ...]  # [L, B, S, R], or per layer: L x [B, S, R]
    lengths: jax.Array  # [B] int32
    kv_scale: jax.Array | None = None  # [L, 2] float32 (c_kv, k_pe) when the cache is FP8 E4M3, else None
    # An FP8 cache holds its codes two per 16-bit word (quant.formats.pack_bytes): c_kv [..., C/2] and k_pe
    # [..., R/2] uint16, so the decode kernel indexes it without wrapping offsets (pallas_kernels/common.py).

    @property
    def fp8(self) -> bool:
        return self.kv_scale is not None

    @property
    def per_layer(self) -> bool:
        return isinstance(self.c_kv, tuple)

    @property
    def max_len(self) -> int:
        return (self.c_kv[0].shape if self.per_layer else self.c_kv.shape[1:])[1]

    @property
    def batch(self) -> int:
        return (self.c_kv[0].shape if self.per_layer else self.c_kv.shape[1:])[0]


def to_per_layer(cache: Cache) -> Cache:
    """The same cache with c_kv / k_pe as tuples of per-layer buffers (new buffers; a no-op if already so)."""
    if cache.per_layer:
        return cache
    return cache.replace(c_kv=tuple(cache.c_kv[j] for j in range(cache.c_kv.shape[0])),
                         k_pe=tuple(cache.k_pe[j] for j in range(cache.k_pe.shape[0])))


def to_stacked(cache: Cache) -> Cache:
    """The same cache with c_kv / k_pe stacked on a leading layer axis (a no-op if already so)."""
    if not cache.per_layer:
        return cache
    return cache.replace(c_kv=jnp.stack(cache.c_kv), k_pe=jnp.stack(cache.k_pe))


def cache_shapes(cfg: Config, batch: int, max_len: int, dtype=None, *, fp8: bool = False,
                 per_layer: bool = False) -> Cache:
    n = cfg.num_hidden_layers
    if fp8:
        if cfg.kv_lora_rank % 2:
            raise ValueError(f"an FP8 cache packs two codes per 16-bit word: kv_lora_rank={cfg.kv_lora_rank} "
                             f"must be even")
        dtype, per_word = jnp.uint16, 2
    else:
        dtype, per_word = dtype or cfg.param_dtype, 1
    c = (batch, max_len, cfg.kv_lora_rank // per_word)
    r = (batch, max_len, cfg.qk_rope_head_dim // per_word)
    if per_layer:
        c_kv, k_pe = ((jax.ShapeDtypeStruct(shape, dtype),) * n for shape in (c, r))
    else:
        c_kv, k_pe = (jax.ShapeDtypeStruct((n, *shape), dtype) for shape in (c, r))
    return Cache(c_kv=c_kv, k_pe=k_pe, lengths=jax.ShapeDtypeStruct((batch,), jnp.int32),
                 kv_scale=jax.ShapeDtypeStruct((n, 2), jnp.float32) if fp8 else None)


def init_cache(cfg: Config, batch: int, max_len: int, dtype=None, *, kv_scale=None, per_layer: bool = False) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens.

    kv_scale: [L, 2] float32 per-layer scales (c_kv, k_pe), from `quant.calibrate`: the cache is then FP8 E4M3
    holding value / scale (as the published FP4 checkpoint's FP8 KV cache does); dtype=float8_e4m3fn without
    scales uses 1.0. per_layer: one buffer per layer (for unstacked weights, see the module docstring).
    """
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    fp8 = kv_scale is not None or (dtype is not None and jnp.dtype(dtype) == jnp.float8_e4m3fn)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         cache_shapes(cfg, batch, max_len, dtype, fp8=fp8, per_layer=per_layer))
    if fp8:
        scale = jnp.ones((cfg.num_hidden_layers, 2), jnp.float32) if kv_scale is None else kv_scale
        scale = jnp.array(scale, jnp.float32, copy=True)  # the cache is donated: never the caller's buffer
        if scale.shape != (cfg.num_hidden_layers, 2):
            raise ValueError(f"kv_scale must be [layers, 2] = {(cfg.num_hidden_layers, 2)}, got {scale.shape}")
        cache = cache.replace(kv_scale=scale)
    return cache


def kv_store(x: jax.Array, scale) -> jax.Array:
    """Values to write into an FP8 cache: x / scale rounded to E4M3 (saturating), two codes per 16-bit word; plain
    caches take x as is."""
    if scale is None:
        return x
    from quant.formats import div, e4m3, pack_bytes
    return pack_bytes(e4m3(div(x, scale)))


def kv_load(c: jax.Array, scale, dtype) -> jax.Array:
    """Cache contents as values of `dtype`."""
    if scale is None:
        return c.astype(dtype)
    from quant.formats import unpack_bytes
    return (unpack_bytes(c).astype(jnp.float32) * scale).astype(dtype)


def cache_bytes_per_token(cfg: Config, dtype=None) -> int:
    itemsize = jnp.dtype(dtype or cfg.param_dtype).itemsize
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
