"""Shared test helpers: random parameters at a scale where every term of the maths matters."""

import zlib

import jax
import numpy as np

from model.params import init


def random_params(cfg, seed: int = 0, with_mtp=None):
    """fan-in scaled matrices; norm weights near 1 and a non-zero router bias, so neither is a silent no-op."""
    p = init(cfg, jax.random.key(seed), std="fan_in", with_mtp=with_mtp)
    key = jax.random.key(seed + 1000)

    def jitter(path, x):
        name = jax.tree_util.keystr(path)
        k = jax.random.fold_in(key, zlib.crc32(name.encode()))  # not hash(): salted per process
        if "norm" in name:
            return (x + 0.2 * jax.random.normal(k, x.shape)).astype(x.dtype)
        if "e_bias" in name:
            return 0.1 * jax.random.normal(k, x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(jitter, p)


def fresh_jit_caches():
    """Monkeypatched twins share static arguments with the real model: drop compiled functions around them."""
    jax.clear_caches()


def teacher_forced_logits(params, cfg, tokens, lengths, steps=3, plan=None, kv_scale=None):
    """Prefill logits at every position, then `steps` teacher-forced decode steps: [B, T + steps, V]. On the
    plan's mesh the parameters and the cache are placed by the rules (model.shard_params / shard_cache)."""
    from model import ExecutionPlan, decode_step, init_cache, prefill, shard_cache, shard_params
    plan = plan or ExecutionPlan()
    cache = init_cache(cfg, tokens.shape[0], tokens.shape[1] + steps + 1, kv_scale=kv_scale)
    if plan.mesh is not None:
        params = shard_params(params, cfg, plan.mesh, plan.rules)
        cache = shard_cache(cache, plan.mesh, plan.rules)
    logits, cache = prefill(params, cache, tokens, lengths, cfg=cfg, all_logits=True, plan=plan)
    out = [np.asarray(logits)]
    for i in range(steps):
        step, cache = decode_step(params, cache, tokens[:, i], cfg=cfg, plan=plan)
        out.append(np.asarray(step)[:, None])
    return np.concatenate(out, 1)


__all__ = ["random_params", "fresh_jit_caches", "teacher_forced_logits"]
