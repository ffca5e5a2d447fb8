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

from quant.qarray import dequantize, is_qarray, map_leading

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


# ---- the cases: (name, thunk returning a row) at DeepSeek's sizes, or tiny ones for a dry run ---------------------

def sizes(dry: bool) -> dict:
    """DeepSeek-V3's sizes, or a dry run's (interpret mode on a CPU: seconds, not minutes)."""
    if dry:
        return {"experts": 16, "top_k": 4, "hidden": 256, "width": 128, "gmm_tokens": (2,), "decode": [(2, 16, 256)],
                "heads": 16, "latent": 64, "rope": 16, "prefill": (1, 64, 2), "nope": 32, "v": 32}
    return {"experts": 256, "top_k": 8, "hidden": 7168, "width": 2048, "gmm_tokens": (8, 16, 32, 64),
            "decode": [(32, 128, 4096), (32, 16, 4096), (128, 128, 4096), (128, 16, 4096), (32, 16, 32768)],
            "heads": 128, "latent": 512, "rope": 64, "prefill": (1, 4096, 128), "nope": 128, "v": 128}


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if np.isnan(got).any():
        return float("nan")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _normal(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(key, shape, F32).astype(dtype)


def _gathered_swiglu(x, a, b, row_expert):
    """The XLA path that reads only the selected experts: each row's gate and up matrices gathered (and
    dequantized after the gather), then a batched product."""
    def rows_of(w):
        g = map_leading(lambda v: jnp.take(v, row_expert, axis=0), w)
        return dequantize(g, x.dtype) if is_qarray(g) else g
    gate = jnp.einsum("RK,RKN->RN", x, rows_of(a), preferred_element_type=F32)
    up = jnp.einsum("RK,RKN->RN", x, rows_of(b), preferred_element_type=F32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def _ragged_swiglu(x, a, b, group_sizes):
    gate = jax.lax.ragged_dot(x, a, group_sizes, preferred_element_type=F32)
    up = jax.lax.ragged_dot(x, b, group_sizes, preferred_element_type=F32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def _experts(sz, fmt, key):
    from pallas_kernels import arg_specs
    k1, k2 = jax.random.split(key)
    spec = arg_specs.expert_weights(fmt, experts=sz["experts"], hidden=sz["hidden"], width=sz["width"])
    return random_weight(k1, spec), random_weight(k2, spec)


def grouped_matmul_rows(sz, fmt, tokens, meters, interpret, *, last=False, block_sizes=None, time=True,
                        reference=False, seed=0, repeats=5):
    """One fused gate/up SwiGLU over `tokens` routed top-k: the kernel timed against the gathering XLA path (and
    lax.ragged_dot for bf16), or checked against the plain-jnp reference."""
    from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference
    key = jax.random.key(seed)
    a, b = _experts(sz, fmt, key)
    gs = routed_sizes(np.random.default_rng(seed), tokens, sz["experts"], sz["top_k"], last=last)
    x = _normal(jax.random.fold_in(key, 7), (int(gs.sum()), sz["hidden"]))
    gsj = jnp.asarray(gs)
    kern = jax.jit(lambda x, a, b, g: grouped_matmul(x, a, g, b, block_sizes=block_sizes, interpret=interpret))
    row = {"fmt": fmt, "tokens": tokens, "rows": int(gs.sum()), "experts_used": int((gs > 0).sum()),
           "block_sizes": str(block_sizes or "default")}
    got = kern(x, a, b, gsj)
    if reference:
        row["rel_err_vs_reference"] = _rel_err(got, jax.jit(grouped_matmul_reference)(x, a, gsj, b))
    if not time:
        return row
    row_expert = jnp.asarray(np.repeat(np.arange(sz["experts"]), gs))
    xla = jax.jit(_gathered_swiglu)
    row["rel_err_vs_xla"] = _rel_err(got, xla(x, a, b, row_expert))
    nbytes, flops = grouped_matmul_cost(a, gs, sz["hidden"], sz["width"], 2)
    floor = floor_seconds(nbytes, flops, *meters)
    t = time_fn(kern, x, a, b, gsj, repeats=repeats)
    row.update(pallas_ms=t * 1e3, xla_gather_ms=time_fn(xla, x, a, b, row_expert, repeats=repeats) * 1e3,
               floor_ms=floor * 1e3,
               pct_of_floor=100 * floor / t, gb_s=nbytes / t / 1e9)
    if fmt == "bf16":
        row["ragged_dot_ms"] = time_fn(jax.jit(_ragged_swiglu), x, a, b, gsj, repeats=repeats) * 1e3
    return row


def mla_decode_rows(sz, batch, heads, cache_len, meters, interpret, *, fp8=False, block_sizes=None, time=True,
                    seed=0, repeats=5):
    """Absorbed decode over full caches (random lengths when checking): the kernel against the plain-jnp form."""
    from pallas_kernels.mla_decode import mla_decode, mla_decode_reference
    c, r = sz["latent"], sz["rope"]
    ks = jax.random.split(jax.random.key(seed), 5)
    q, qp = _normal(ks[0], (batch, heads, c)), _normal(ks[1], (batch, heads, r))
    if fp8:
        from quant.formats import pack_bytes
        cache = [pack_bytes(_normal(k, (batch, cache_len, w), F32).astype(jnp.float8_e4m3fn))
                 for k, w in ((ks[2], c), (ks[3], r))]
        kv_scale = jnp.array([0.05, 0.1], F32)
    else:
        cache, kv_scale = [_normal(ks[2], (batch, cache_len, c)), _normal(ks[3], (batch, cache_len, r))], None
    lengths = (jnp.full((batch,), cache_len, jnp.int32) if time else
               jax.random.randint(ks[4], (batch,), 1, cache_len + 1, jnp.int32))
    kern = jax.jit(lambda *a: mla_decode(*a, sm_scale=0.1, kv_scale=kv_scale, block_sizes=block_sizes,
                                         interpret=interpret))
    ref = jax.jit(lambda *a: mla_decode_reference(*a, sm_scale=0.1, kv_scale=kv_scale))
    args = (q, qp, *cache, lengths)
    got = kern(*args)
    row = {"batch": batch, "heads": heads, "context": cache_len, "cache": "fp8" if fp8 else "bf16",
           "block_sizes": str(block_sizes or "default"), "rel_err_vs_xla": _rel_err(got, ref(*args))}
    if not time:
        return row
    nbytes, flops = mla_decode_cost(batch, heads, cache_len, c, r, 1 if fp8 else 2)
    floor = floor_seconds(nbytes, flops, *meters)
    t = time_fn(kern, *args, repeats=repeats)
    row.update(pallas_ms=t * 1e3, xla_ms=time_fn(ref, *args, repeats=repeats) * 1e3, floor_ms=floor * 1e3,
               pct_of_floor=100 * floor / t, bound="memory" if nbytes / meters[0] >= flops / meters[1] else "compute")
    return row


def mla_prefill_rows(sz, batch, length, heads, meters, interpret, *, block_sizes=None, time=True, seed=0,
                     repeats=5):
    """Causal prefill attention: the kernel against the plain-jnp form; its FLOP rate against the matmul meter."""
    from pallas_kernels.mla_prefill import mla_prefill, mla_prefill_reference
    h, r, v = sz["nope"], sz["rope"], sz["v"]
    ks = jax.random.split(jax.random.key(seed), 5)
    args = (_normal(ks[0], (batch, length, heads, h)), _normal(ks[1], (batch, length, heads, r)),
            _normal(ks[2], (batch, length, heads, h)), _normal(ks[3], (batch, length, r)),
            _normal(ks[4], (batch, length, heads, v)), jnp.full((batch,), length, jnp.int32))
    kern = jax.jit(lambda *a: mla_prefill(*a, sm_scale=0.07, block_sizes=block_sizes, interpret=interpret))
    ref = jax.jit(lambda *a: mla_prefill_reference(*a, sm_scale=0.07))
    got = kern(*args)
    row = {"batch": batch, "length": length, "heads": heads, "block_sizes": str(block_sizes or "default"),
           "rel_err_vs_xla": _rel_err(got, ref(*args))}
    if not time:
        return row
    nbytes, flops = mla_prefill_cost(batch, length, heads, h, r, v)
    t = time_fn(kern, *args, repeats=repeats)
    row.update(pallas_ms=t * 1e3, xla_ms=time_fn(ref, *args, repeats=repeats) * 1e3, tflop_s=flops / t / 1e12,
               pct_of_matmul_rate=100 * flops / t / meters[1],
               floor_ms=floor_seconds(nbytes, flops, *meters) * 1e3)
    return row
