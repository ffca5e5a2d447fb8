"""Multi-token prediction (depth 1): from the main model's final-normed hidden state h_i and the embedding of
token t_{i+1}, one extra decoder layer predicts t_{i+2}:

    h' = eh_proj [enorm(Emb(t_{i+1})) ; hnorm(h_i)]   (embedding first, as the released weights and engines do)
    logits = lm_head(norm(Block(h')))                    (Block at RoPE position i+1; embedding and head shared)
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import Cache
from model.config import Config
from model.forward import block, forward, lm_logits
from model.layers import dot, rms_norm
from model.params import Params
from model.plan import ExecutionPlan
from model.sampling import accept_rows, greedy, sample_rows, stream_keys


def _mtp_input(params: Params, hidden: jax.Array, next_tokens: jax.Array, cfg: Config) -> jax.Array:
    m = params.mtp
    e = rms_norm(params.embed[next_tokens], m.enorm, cfg.rms_norm_eps)
    h = rms_norm(hidden, m.hnorm, cfg.rms_norm_eps)
    return dot(jnp.concatenate([e, h], axis=-1), m.eh_proj, "BTK,KD->BTD")  # [B, T, D]


def mtp_hidden(params: Params, hidden: jax.Array, next_tokens: jax.Array, cfg: Config, plan: ExecutionPlan,
               phase: str, positions=None, segments=None):
    """hidden: [B, T, D] main-model final-normed states at positions 0..T-1; next_tokens: [B, T] = t_{i+1}.

    Returns the MTP's normed hidden states [B, T, D] (position i predicts t_{i+2}) and, in the train phase, the
    MTP layer's (load, balance) stats. positions: the main model's positions of `hidden` (default 0..T-1); the
    MTP layer runs one position later. segments: [B, T] document ids of packed training rows.
    """
    b, t = next_tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x, _, stats = block(params.mtp.layer, _mtp_input(params, hidden, next_tokens, cfg), None, positions, segments,
                        cfg, plan, phase, rope_offset=1)
    return rms_norm(x, params.mtp.norm, cfg.rms_norm_eps), stats


def mtp_step(params: Params, cache: Cache, hidden: jax.Array, next_tokens: jax.Array, positions: jax.Array,
             cfg: Config, plan: ExecutionPlan, phase: str):
    """The MTP layer with its own latent cache (serving): as `mtp_hidden`, the entry for main position i written
    at cache slot i (RoPE at i + 1). cache: c_kv [1, B, S, C], k_pe [1, B, S, R]; phase "prefill" writes from
    slot 0 and attends among the T entries, "decode" writes at `positions` and attends over the cache.

    Returns (normed hidden [B, T, D], the new cache)."""
    x, cache, _ = block(params.mtp.layer, _mtp_input(params, hidden, next_tokens, cfg), cache, positions, None, cfg,
                        plan, phase, rope_offset=1)
    return rms_norm(x, params.mtp.norm, cfg.rms_norm_eps), cache


def verify_step(params: Params, cache: Cache, mtp: Cache, pending, draft, q_logits, n_out, keys_at, temperature,
                top_k, top_p, cfg: Config, plan: ExecutionPlan):
    """One self-speculative step for every row, the one both `generate(..., speculative=True)` and the engine run:
    [pending token, draft] through the main model at positions n, n + 1 (the cache holds n tokens); the draft
    verified against the logits at n (`accept_rows`: accepted, or replaced by a token of the target's
    distribution); a second token sampled from the logits at n + 1 (kept only when the draft was accepted); the MTP
    layer on both new entries, (h_n, first token) and (h_n+1, second token), drafting the next token from the
    last accepted one.

    pending, draft, n_out (tokens emitted so far): [B]; q_logits: [B, V] the draft's logits; keys_at(step) -> [B]
    keys of each row's output position `step`; temperature, top_k, top_p: [B]. The cache lengths are the
    caller's to advance (by 1 + accepted where a row goes on). Returns (logits [B, 2, V], accepted [B], first
    token [B], second token [B], the next draft [B] and its logits [B, V], the cache, the MTP cache)."""
    pos = cache.lengths[:, None] + jnp.arange(2, dtype=jnp.int32)  # [B, 2]
    hidden, cache, _ = forward(params, cache, jnp.stack([pending, draft], 1), pos, None, cfg, plan, "decode")
    logits = lm_logits(params, hidden, cfg)  # [B, 2, V]
    ok, tok1 = accept_rows(logits[:, 0], q_logits, draft, keys_at(n_out), temperature, top_k, top_p)
    tok2 = sample_rows(logits[:, 1], keys_at(n_out + 1), temperature, top_k, top_p)
    g, mtp = mtp_step(params, mtp, hidden, jnp.stack([tok1, tok2], 1), pos, cfg, plan, "decode")
    q_new = lm_logits(params, jnp.take_along_axis(g, ok.astype(jnp.int32)[:, None, None], axis=1)[:, 0], cfg)
    nxt = sample_rows(q_new, stream_keys(keys_at(n_out + 1 + ok), 1), temperature, top_k, top_p)
    return logits, ok, tok1, tok2, nxt, q_new, cache, mtp


def mtp_logits(params: Params, hidden, next_tokens, cfg: Config, plan: ExecutionPlan = ExecutionPlan()):
    return lm_logits(params, mtp_hidden(params, hidden, next_tokens, cfg, plan, "prefill")[0], cfg)


def chained_acceptance(params: Params, cfg: Config, tokens, start: int, depth: int,
                       plan: ExecutionPlan = ExecutionPlan()) -> np.ndarray:
    """How often the MTP module, chained on its own outputs, drafts what the main model would say: for one
    sequence `tokens` [T] (a prompt and the main model's greedy continuation from `start`), at every position j
    from `start` on, draft d_1 from (h_j-1, t_j) as serving does, then d_l from (the module's own hidden state of
    d_l-1, d_l-1) at the next slot of its cache, for l = 2..depth (DeepSeek-V3 trains one module; chaining it is
    how MTP depth > 1 is served with it). Returns [depth]: the fraction of positions where d_1..d_l all equal
    t_j+1..t_j+l, which is the chance a verify step accepts at least l drafts."""
    return draft_hits(params, cfg, tokens, start, depth, plan).mean(axis=1)


def draft_hits(params: Params, cfg: Config, tokens, start: int, depth: int,
               plan: ExecutionPlan = ExecutionPlan()) -> np.ndarray:
    """[depth, J] bool, for `chained_acceptance`: whether d_1..d_l all equal t_j+1..t_j+l at each position j =
    start, ..., len(tokens) - depth - 1."""
    t = len(tokens)
    if not 1 <= start < t - depth or depth < 1:
        raise ValueError(f"need 1 <= start < len(tokens) - depth, got start={start}, depth={depth}, {t} tokens")
    z = jnp.asarray(tokens, jnp.int32)[None]  # [1, T]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    return np.asarray(_chain(params, z, pos, start, depth, cfg, plan))


@partial(jax.jit, static_argnames=("start", "depth", "cfg", "plan"))
def _chain(params, z, pos, start, depth, cfg, plan):
    t = z.shape[1]
    cache = Cache(c_kv=jnp.zeros((cfg.num_hidden_layers, 1, t, cfg.kv_lora_rank), cfg.param_dtype),
                  k_pe=jnp.zeros((cfg.num_hidden_layers, 1, t, cfg.qk_rope_head_dim), cfg.param_dtype),
                  lengths=jnp.full((1,), t, jnp.int32))
    hidden, _, _ = forward(params, cache, z, pos, None, cfg, plan, "prefill")
    mtp = jax.tree.map(lambda a: a[:1], cache)
    nxt = jnp.concatenate([z[:, 1:], z[:, :1]], axis=1)
    g, mtp = mtp_step(params, mtp, hidden, nxt, pos, cfg, plan, "prefill")
    j = jnp.arange(start, t - depth)  # [J] positions of the pending token
    n = j.shape[0]
    g = g[0, j - 1]  # [J, D]: the module's state that drafts t_j+1
    mtp = jax.tree.map(lambda a: jnp.repeat(a, n, axis=-3) if a.ndim == 4 else jnp.repeat(a, n), mtp)
    ok = jnp.ones(n, bool)
    rates = []  # per level: [J] bool
    for level in range(1, depth + 1):
        d = greedy(lm_logits(params, g, cfg))  # [J]
        ok = ok & (d == z[0, j + level])
        rates.append(ok)
        if level < depth:
            slot = (j + level - 1)[:, None]  # the chained entry sits one slot further each level
            g, mtp = mtp_step(params, mtp, g[:, None], d[:, None], slot, cfg, plan, "decode")
            g = g[:, 0]
    return jnp.stack(rates)
