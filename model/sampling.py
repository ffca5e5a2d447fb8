"""Token sampling: greedy, temperature, top-k, top-p, with per-sequence keys (vLLM's parameter names).

Each sequence's key is fold_in(fold_in(key(seed), request_id), step), so a sequence samples the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1 means off
    seed: int = 0

    def __post_init__(self):
        # a NaN passes every comparison below unnoticed and samples token 0 forever: types and finiteness first
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        for name in ("top_k", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def greedy(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index of the largest value; a NaN counts as largest), as int32.

    Written as a max and a min: XLA:CPU runs jnp.argmax's paired (value, index) reduction scalar by scalar, 142 us
    over a 32k vocabulary against 14 us for these two (on this project's 2-core machine), which is 1-2% of a `small`
    decode step."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == m) | jnp.isnan(logits)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, iota, logits.shape[-1]), axis=-1)


def sample(logits: jax.Array, keys: jax.Array, sp: SamplingParams) -> jax.Array:
    """logits: [B, V] float32; keys: [B] typed PRNG keys. Returns [B] int32."""
    if sp.greedy:
        return greedy(logits)
    return jax.vmap(jax.random.categorical)(keys, filtered_logits(logits, sp)).astype(jnp.int32)


def filtered_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """[B, V] float32 logits of the distribution `sample` draws from (sp not greedy): divided by the temperature,
    -inf outside the top-k and the top-p nucleus."""
    b = logits.shape[0]
    return filtered_rows(logits, jnp.full(b, sp.temperature, jnp.float32), jnp.full(b, sp.top_k, jnp.int32),
                         jnp.full(b, sp.top_p, jnp.float32))


def filtered_rows(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """`filtered_logits` with each row's own parameters: temperature, top_k, top_p [B] (a temperature of 0 is
    treated as 1 here; `sample_rows` takes the argmax for those rows)."""
    v = logits.shape[-1]
    logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_desc = jnp.where(sorted_desc < kth, -jnp.inf, sorted_desc)  # the top-k survivors, still sorted
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep_sorted = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)  # always keeps the top token
    threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """`sample` with each row's own parameters ([B] arrays; temperature 0: that row's argmax). Returns [B] int32."""
    def mixed():
        drawn = jax.vmap(jax.random.categorical)(keys, filtered_rows(logits, temperature, top_k, top_p))
        return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy(logits))
    # an all-greedy batch skips the sort the filters need (15% of a bundled-model engine step at 16 slots)
    return jax.lax.cond(jnp.any(temperature > 0), mixed, lambda: greedy(logits))


def row_keys(seeds: jax.Array, request_ids: jax.Array, steps: jax.Array) -> jax.Array:
    """`step_keys` with each row's own seed: [B] keys fold_in(fold_in(key(seed), request_id), step)."""
    return jax.vmap(lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), t))(
        seeds, request_ids, steps)


def step_keys(seed: int, request_ids: jax.Array, step) -> jax.Array:
    """[B] keys of output position `step` (a scalar, or [B] when the sequences are at different positions)."""
    base = jax.random.key(seed)
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), request_ids.shape)
    return jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(base, r), s))(request_ids, steps)


def draft_keys(seed: int, request_ids: jax.Array, step, stream: int) -> jax.Array:
    """Keys of speculative decoding's own draws for output position `step`, apart from `step_keys`'s: stream 1
    samples the draft, 2 the acceptance test, 3 the residual."""
    return stream_keys(step_keys(seed, request_ids, step), stream)


def stream_keys(keys: jax.Array, stream: int) -> jax.Array:
    """[B] keys folded with a stream number (`draft_keys`)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def accept_draft(target_logits: jax.Array, draft_logits: jax.Array, draft: jax.Array, seed: int,
                 request_ids: jax.Array, step, sp: SamplingParams):
    """Speculative sampling's verification of one drafted token per sequence (Leviathan et al. 2023; Chen et al.
    2023): the token returned is distributed exactly as `sample(target_logits)` would draw it.

    target_logits, draft_logits: [B, V] (the main model's and the draft's at the drafted position); draft: [B], drawn
    from the draft's distribution (`sample(draft_logits, draft_keys(.., 1), sp)`). Greedy: accepted when the draft
    is the target's argmax, which is the token. Otherwise, with p and q the filtered distributions: accepted with
    probability min(1, p(d) / q(d)); else the token is drawn from max(p - q, 0), renormalised.
    Returns (accepted [B] bool, token [B] int32)."""
    if sp.greedy:
        tok = greedy(target_logits)
        return tok == draft, tok
    b = target_logits.shape[0]
    keys = step_keys(seed, request_ids, step)
    return accept_rows(target_logits, draft_logits, draft, keys, jnp.full(b, sp.temperature, jnp.float32),
                       jnp.full(b, sp.top_k, jnp.int32), jnp.full(b, sp.top_p, jnp.float32))


def accept_rows(target_logits, draft_logits, draft, keys, temperature, top_k, top_p):
    """`accept_draft` with each row's own parameters ([B]; temperature 0: greedy verification) and its step key
    (`row_keys`; streams 2 and 3 are drawn from it)."""
    tok = greedy(target_logits)

    def mixed():
        p = jax.nn.softmax(filtered_rows(target_logits, temperature, top_k, top_p), axis=-1)
        q = jax.nn.softmax(filtered_rows(draft_logits, temperature, top_k, top_p), axis=-1)
        pick = draft[:, None].astype(jnp.int32)
        p_d, q_d = (jnp.take_along_axis(x, pick, axis=-1)[:, 0] for x in (p, q))
        u = jax.vmap(jax.random.uniform)(stream_keys(keys, 2))
        accepted = u * q_d < p_d  # u < p(d) / q(d), without dividing by a q(d) that rounds to 0
        residual = jnp.maximum(p - q, 0.0)
        residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p)  # p == q: never rejected
        other = jax.vmap(jax.random.categorical)(stream_keys(keys, 3), jnp.log(residual))
        sampled = temperature > 0
        return (jnp.where(sampled, accepted, tok == draft),
                jnp.where(sampled, jnp.where(accepted, draft, other).astype(jnp.int32), tok))
    # an all-greedy batch skips the filters' sorts, as `sample_rows` does
    return jax.lax.cond(jnp.any(temperature > 0), mixed, lambda: (tok == draft, tok))
