"""The latent KV cache: per layer and token only the normalised latent c_kv [C] and the rotated rope key [R].

Layout: c_kv [L, B, S, C], k_pe [L, B, S, R], lengths [B] (tokens already written per sequence). For the 671B
that is 61 x (512 + 64) values per token: 70,272 bytes in bf16, against ~5 MB for a full multi-head K/V cache.
The layer scan carries the whole cache; each layer writes its new entries into these buffers in place and its
attention reads its slice (`layer_view`), a `Cache` of the same class: c_kv [B, S, C], k_pe [B, S, R],
kv_scale [2]. `span`, a static bound set by a caller that knows the lengths on the host (the engine), cuts that
slice to the first `span` positions: a program whose sequences are short reads, and attends over, only those, not
the whole `max_len`.

An FP8 cache holds E4M3 codes of value / scale, two per 16-bit word (quant.formats.pack_bytes: c_kv [..., C/2]
and k_pe [..., R/2] uint16, so the decode kernel indexes it without wrapping offsets, pallas_kernels/common.py),
with per-layer scales kv_scale [L, 2] (c_kv, k_pe) from calibration, as the published FP4 checkpoint's FP8 cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from model.config import Config
from quant.formats import div, e4m3, pack_bytes, unpack_bytes


@struct.dataclass
class Cache:
    c_kv: jax.Array  # [L, B, S, C] (a layer's slice: [B, S, C]); FP8: uint16 words [..., C/2]
    k_pe: jax.Array  # [L, B, S, R] (a layer's slice: [B, S, R]); FP8: uint16 words [..., R/2]
    lengths: jax.Array  # [B] int32
    kv_scale: jax.Array | None = None  # [L, 2] float32 (c_kv, k_pe) when the cache is FP8 E4M3, else None
    # positions the attention reads (static: one program per value); every position a query attends must lie
    # below it, which the caller guarantees; None: all of max_len
    span: int | None = struct.field(pytree_node=False, default=None)

    @property
    def fp8(self) -> bool:
        return self.kv_scale is not None

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[-2]

    @property
    def batch(self) -> int:
        return self.c_kv.shape[-3]


def cache_shapes(cfg: Config, batch: int, max_len: int, dtype=None, *, fp8: bool = False) -> Cache:
    n = cfg.num_hidden_layers
    if fp8:
        if cfg.kv_lora_rank % 2:
            raise ValueError(f"an FP8 cache packs two codes per 16-bit word: kv_lora_rank={cfg.kv_lora_rank} "
                             f"must be even")
        dtype, per_word = jnp.uint16, 2
    else:
        dtype, per_word = dtype or cfg.param_dtype, 1
    c_kv, k_pe = (jax.ShapeDtypeStruct((n, batch, max_len, width // per_word), dtype)
                  for width in (cfg.kv_lora_rank, cfg.qk_rope_head_dim))
    return Cache(c_kv=c_kv, k_pe=k_pe, lengths=jax.ShapeDtypeStruct((batch,), jnp.int32),
                 kv_scale=jax.ShapeDtypeStruct((n, 2), jnp.float32) if fp8 else None)


def init_cache(cfg: Config, batch: int, max_len: int, dtype=None, *, kv_scale=None) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens.

    kv_scale: [L, 2] float32 per-layer scales (c_kv, k_pe), from `model.calibrate`: the cache is then FP8 (see
    the module docstring); dtype=float8_e4m3fn without scales uses 1.0.
    """
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    fp8 = kv_scale is not None or (dtype is not None and jnp.dtype(dtype) == jnp.float8_e4m3fn)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, max_len, dtype, fp8=fp8))
    if fp8:
        scale = jnp.ones((cfg.num_hidden_layers, 2), jnp.float32) if kv_scale is None else kv_scale
        scale = jnp.array(scale, jnp.float32, copy=True)  # the cache is donated: never the caller's buffer
        if scale.shape != (cfg.num_hidden_layers, 2):
            raise ValueError(f"kv_scale must be [layers, 2] = {(cfg.num_hidden_layers, 2)}, got {scale.shape}")
        cache = cache.replace(kv_scale=scale)
    return cache


def layer_view(cache: Cache, layer) -> Cache:
    """Layer `layer` (an int or a traced index) of a stack's cache, as the attention reads it: c_kv [B, S, C],
    k_pe [B, S, R], kv_scale [2]; S = the cache's span when it has one (the slice is all that is read)."""
    def take(a):
        return jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)[:, :cache.span]
    return Cache(c_kv=take(cache.c_kv), k_pe=take(cache.k_pe), lengths=cache.lengths,
                 kv_scale=None if cache.kv_scale is None else
                 jax.lax.dynamic_index_in_dim(cache.kv_scale, layer, 0, keepdims=False), span=cache.span)


def kv_store(x: jax.Array, kv_scale, which: int) -> jax.Array:
    """Values to write into a layer's cache: FP8 (kv_scale [2] given) as x / kv_scale[which] rounded to E4M3
    (saturating), two codes per 16-bit word; a plain cache takes x as is. which: 0 for c_kv, 1 for k_pe."""
    if kv_scale is None:
        return x
    return pack_bytes(e4m3(div(x, kv_scale[which])))


def kv_load(c: jax.Array, kv_scale, which: int, dtype) -> jax.Array:
    """A layer's cache contents as values of `dtype` (the inverse of `kv_store`, up to its rounding)."""
    if kv_scale is None:
        return c.astype(dtype)
    return (unpack_bytes(c).astype(jnp.float32) * kv_scale[which]).astype(dtype)


def cache_bytes_per_token(cfg: Config, dtype=None) -> int:
    itemsize = jnp.dtype(dtype or cfg.param_dtype).itemsize
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
