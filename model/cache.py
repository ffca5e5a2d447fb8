"""The latent KV cache: per layer and token only the normalised latent c_kv [C] and the rotated rope key [R].

Layout: c_kv [L, B, S, C], k_pe [L, B, S, R], lengths [B] (tokens already written per sequence). For the 671B
that is 61 x (512 + 64) values per token: 70,272 bytes in bf16, against ~5 MB for a full multi-head K/V cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from model.config import Config


@struct.dataclass
class Cache:
    c_kv: jax.Array  # [L, B, S, C]
    k_pe: jax.Array  # [L, B, S, R]
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[2]

    @property
    def batch(self) -> int:
        return self.c_kv.shape[1]


def cache_shapes(cfg: Config, batch: int, max_len: int, dtype=None) -> Cache:
    dtype = dtype or cfg.param_dtype
    n = cfg.num_hidden_layers
    return Cache(c_kv=jax.ShapeDtypeStruct((n, batch, max_len, cfg.kv_lora_rank), dtype),
                 k_pe=jax.ShapeDtypeStruct((n, batch, max_len, cfg.qk_rope_head_dim), dtype),
                 lengths=jax.ShapeDtypeStruct((batch,), jnp.int32))


def init_cache(cfg: Config, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, max_len, dtype))


def cache_bytes_per_token(cfg: Config, dtype=None) -> int:
    itemsize = jnp.dtype(dtype or cfg.param_dtype).itemsize
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
