"""Multi-token prediction (depth 1): from the main model's final-normed hidden state h_i and the embedding of
token t_{i+1}, one extra decoder layer predicts t_{i+2}:

    h' = eh_proj [enorm(Emb(t_{i+1})) ; hnorm(h_i)]   (embedding first, as the released weights and engines do)
    logits = lm_head(norm(Block(h')))                    (Block at RoPE position i+1; embedding and head shared)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.config import Config
from model.forward import block, lm_logits
from model.layers import dot, rms_norm
from model.params import Params
from model.plan import ExecutionPlan


def mtp_hidden(params: Params, hidden: jax.Array, next_tokens: jax.Array, cfg: Config, plan: ExecutionPlan,
               phase: str, positions=None, segments=None):
    """hidden: [B, T, D] main-model final-normed states at positions 0..T-1; next_tokens: [B, T] = t_{i+1}.

    Returns the MTP's normed hidden states [B, T, D] (position i predicts t_{i+2}) and, in the train phase, the
    MTP layer's (load, balance) stats. positions: the main model's positions of `hidden` (default 0..T-1); the
    MTP layer runs one position later. segments: [B, T] document ids of packed training rows.
    """
    m = params.mtp
    e = rms_norm(params.embed[next_tokens], m.enorm, cfg.rms_norm_eps)
    h = rms_norm(hidden, m.hnorm, cfg.rms_norm_eps)
    x = dot(jnp.concatenate([e, h], axis=-1), m.eh_proj, "BTK,KD->BTD")  # [B, T, D]
    b, t = next_tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x, _, stats = block(m.layer, x, None, positions + 1, segments, cfg, plan, phase)
    return rms_norm(x, m.norm, cfg.rms_norm_eps), stats


def mtp_logits(params: Params, hidden, next_tokens, cfg: Config, plan: ExecutionPlan = ExecutionPlan()):
    return lm_logits(params, mtp_hidden(params, hidden, next_tokens, cfg, plan, "prefill")[0], cfg)
