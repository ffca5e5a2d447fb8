"""Measuring the kernels: a timer, the two meters every figure is judged against (copy bandwidth, bf16 matmul
rate), the roofline floor, random operands for the abstract arguments of arg_specs.py, and each kernel's bytes
and FLOPs. scripts/gpu_check.py drives them.

Timing follows how a GPU is timed: compile and warm up twice, then several repeats of N back-to-back calls with one
sync at the end of each (one sync per call would add tens of microseconds to a 50 us kernel), the median repeat.
The floor is max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate): what the machine could do at
best, measured in the same run.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from quant.qarray import QArray, is_qarray

F32 = jnp.float32


def time_fn(fn, *args, repeats: int = 5, min_repeat_s: float = 0.02, max_calls: int = 1000) -> float:
    """Median seconds per call of a jitted fn over `repeats` repeats of back-to-back calls."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-7)
    calls = int(min(max_calls, max(1, min_repeat_s / one)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes per second of `a + 1` over a bf16 array of nbytes, counting the read and the write."""
    a = jnp.zeros((nbytes // 2,), jnp.bfloat16)
    return 2 * nbytes / time_fn(jax.jit(lambda a: a + 1), a)


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n^3 bf16 matmul with float32 accumulation, on random data."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=F32).astype(jnp.bfloat16))
    return 2 * n ** 3 / time_fn(f, a, b)


def floor_seconds(nbytes: float, flops: float, bandwidth: float, rate: float) -> float:
    return max(nbytes / bandwidth, flops / rate)


# ---- random operands for abstract arguments -----------------------------------------------------------------

def _random_leaf(key, spec, role: str = "value"):
    shape, dtype = spec.shape, jnp.dtype(spec.dtype)
    if role == "fp8_words":  # E4M3 codes two per word, never the NaN pattern (0x7F / 0xFF)
        byte = jax.random.randint(key, (*shape, 2), 0, 0xFE, jnp.int32)
        byte = jnp.where((byte & 0x7F) == 0x7F, byte - 1, byte).astype(jnp.uint16)
        return byte[..., 0] | (byte[..., 1] << 8)
    if role == "e4m3_scales":
        return jax.random.uniform(key, shape, F32, 0.5, 2.0).astype(dtype)
    if role == "e8m0_scales":
        return jax.random.randint(key, shape, 120, 127, jnp.int32).astype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jax.random.randint(key, shape, 0, 256, jnp.int32).astype(dtype)
    return (jax.random.normal(key, shape, F32) * (1.0 if role == "value" else 0.02)).astype(dtype)


def random_weight(key, spec, scale: float = 0.02):
    """Random values for a plain weight spec (normal times `scale`) or an abstract QArray (valid random codes and
    scales of its format, about `scale` in magnitude once dequantized), made on the device."""
    if not is_qarray(spec):
        return (jax.random.normal(key, spec.shape, F32) * scale).astype(spec.dtype)
    kc, ks = jax.random.split(key)
    if spec.fmt == "fp8":
        codes = _random_leaf(kc, spec.codes, "fp8_words")
        scales = jnp.full(spec.scales.shape, scale / 100.0, F32)
        return spec.replace(codes=codes, scales=scales)
    codes = _random_leaf(kc, spec.codes)
    if spec.fmt == "nvfp4":
        scales = _random_leaf(ks, spec.scales, "e4m3_scales")
        return spec.replace(codes=codes, scales=scales, tensor_scale=jnp.full(spec.tensor_scale.shape, scale / 4, F32))
    return spec.replace(codes=codes, scales=jnp.full(spec.scales.shape, 127 + int(np.log2(scale / 4)), jnp.uint8))


def routed_sizes(rng: np.random.Generator, tokens: int, experts: int, top_k: int, last: bool = False) -> np.ndarray:
    """Group sizes [E] of `tokens` each routed to top_k distinct experts (uniformly, or all to the last top_k)."""
    if last:
        ids = np.tile(np.arange(experts - top_k, experts), tokens)
    else:
        ids = np.concatenate([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    return np.bincount(ids, minlength=experts).astype(np.int32)


# ---- bytes and FLOPs ------------------------------------------------------------------------------------------

def weight_bytes_per_expert(w) -> float:
    """Stored bytes of one [K, N] matrix of a stack (codes and scales, or the plain matrix)."""
    if is_qarray(w):
        leaves = [x for x in (w.codes, w.scales, w.tensor_scale) if x is not None]
        return sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves) / w.codes.shape[0]
    return w.shape[1] * w.shape[2] * jnp.dtype(w.dtype).itemsize


def grouped_matmul_cost(w, sizes: np.ndarray, k: int, n: int, n_weights: int, x_itemsize: int = 2):
    """(bytes, FLOPs): every used expert's matrices read once, the rows in and out; 2 FLOPs per multiply-add."""
    rows = int(sizes.sum())
    used = int((sizes > 0).sum())
    nbytes = used * n_weights * weight_bytes_per_expert(w) + rows * (k + n) * x_itemsize
    return nbytes, 2.0 * rows * k * n * n_weights


def mla_decode_cost(batch: int, heads: int, cache_len: int, latent: int, rope: int, kv_itemsize: float,
                    q_itemsize: int = 2):
    """(bytes, FLOPs) of absorbed decode attention over full caches: the cache once, queries in, float32 out."""
    nbytes = batch * cache_len * (latent + rope) * kv_itemsize + batch * heads * ((latent + rope) * q_itemsize
                                                                                 + latent * 4)
    return nbytes, 2.0 * batch * heads * cache_len * (2 * latent + rope)


def mla_prefill_cost(batch: int, length: int, heads: int, nope: int, rope: int, v: int, itemsize: int = 2):
    """(bytes, FLOPs) of causal prefill attention: each input and the output once; the causal half of the
    score and value products."""
    pairs = length * (length + 1) / 2
    nbytes = batch * length * (heads * (2 * nope + rope + 2 * v) + rope) * itemsize
    return nbytes, 2.0 * batch * heads * pairs * (nope + rope + v)


__all__ = ["QArray", "copy_bandwidth", "floor_seconds", "grouped_matmul_cost", "matmul_rate", "mla_decode_cost",
           "mla_prefill_cost", "random_weight", "routed_sizes", "time_fn", "weight_bytes_per_expert"]
