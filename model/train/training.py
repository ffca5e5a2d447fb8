"""Training: next-token loss + MTP loss + DeepSeek-V3's sequence-wise balance loss, AdamW with warm-up and
cosine decay and gradient clipping, and the auxiliary-loss-free router bias update after each step.

The router bias (`e_bias`) is not trained by gradient: after each step b_i -= gamma * sign(load_i - mean load)
per layer, so overloaded experts become less likely to be selected.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import optax

from model.config import Config
from model.forward import forward, lm_logits
from model.mtp import mtp_hidden
from model.params import Params
from model.plan import ExecutionPlan


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1700
    batch: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 100
    min_lr_frac: float = 0.1
    weight_decay: float = 0.05
    clip: float = 1.0
    mtp_weight: float = 0.3
    balance_alpha: float = 1e-4
    bias_update_speed: float = 0.02  # gamma (DeepSeek-V3: 1e-3 over a far longer run)
    seed: int = 0
    text_frac: float = 0.3
    pack_documents: bool = True  # arithmetic rows: each problem its own document (own positions, no cross-attention)
    answer_weight: float = 2.0  # loss weight of worked-answer tokens relative to question and text tokens
    init_from: str = ""  # a checkpoint to continue from (fresh optimizer state); empty: random init

    def __post_init__(self):
        """Refuse, before anything is built, settings that would train on nonsense or crash later."""
        problems = []
        for name, (lo, hi, lo_open) in _LIMITS.items():
            v = getattr(self, name)
            integral = name in _INTEGERS
            if isinstance(v, bool) or not isinstance(v, int if integral else (int, float)) or not math.isfinite(v):
                problems.append(f"{name} must be a finite {'integer' if integral else 'number'}, got {v!r}")
            elif v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
                bounds = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
                problems.append(f"{name} must be {bounds}, got {v!r}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))


# (lower bound, upper bound or None, lower bound excluded) per setting; the integer ones
_LIMITS = {"steps": (1, None, False), "batch": (1, None, False), "seq_len": (2, None, False),
           "warmup": (0, None, False), "lr": (0, None, False), "min_lr_frac": (0, 1, False),
           "weight_decay": (0, None, False), "clip": (0, None, True), "mtp_weight": (0, None, False),
           "balance_alpha": (0, None, False), "bias_update_speed": (0, None, False), "text_frac": (0, 1, False),
           "answer_weight": (0, None, False)}
_INTEGERS = ("steps", "batch", "seq_len", "warmup")


def _ce(logits, targets, weights=None):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if weights is None:
        return jnp.mean(nll)
    return jnp.sum(weights * nll) / jnp.maximum(jnp.sum(weights), 1e-6)


def segment_positions(segments: jax.Array) -> jax.Array:
    """[B, T] document ids -> each token's position within its document (0 at every document start)."""
    t = segments.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segments.shape)
    new = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(new, idx, 0), axis=1)


def loss_fn(params: Params, tokens: jax.Array, cfg: Config, tc: TrainConfig, segments=None, weights=None,
            plan: ExecutionPlan = ExecutionPlan()):
    """tokens: [B, T+1]. segments: [B, T+1] document ids of packed rows (None: one document per row), weights:
    [B, T+1] loss weight of predicting each token (None: all 1). A target in another document than the token that
    predicts it is never scored. plan: the default runs the routed experts on the differentiable grouped path,
    which reads only the experts each token is routed to. Returns (loss, metrics with per-layer loads
    [Lm(+1), E])."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    if weights is None:
        weights = jnp.ones(tokens.shape, jnp.float32)
    seg_in = None if segments is None else segments[:, :-1]
    if segments is None:
        segments = jnp.zeros(tokens.shape, jnp.int32)
    positions = segment_positions(segments[:, :-1])
    w_main = weights[:, 1:] * (segments[:, 1:] == segments[:, :-1])  # predicting token i+1 from position i
    w_mtp = weights[:, 2:] * (segments[:, 2:] == segments[:, :-2])  # the MTP's token i+2 from position i
    hidden, _, (load, balance) = forward(params, None, inp, positions, seg_in, cfg, plan, "train")
    ce = _ce(lm_logits(params, hidden, cfg), tgt, w_main)
    loss = ce + tc.balance_alpha * balance.sum()
    metrics = {"ce": ce, "balance": balance.mean()}
    if params.mtp is not None:
        # position i (< T-1) sees h_i and t_{i+1} = tgt[:, i] and predicts t_{i+2} = tgt[:, i+1]
        h_mtp, (mload, mbal) = mtp_hidden(params, hidden[:, :-1], tgt[:, :-1], cfg, plan, "train",
                                          positions=positions[:, :-1],
                                          segments=None if seg_in is None else seg_in[:, :-1])
        mtp_ce = _ce(lm_logits(params, h_mtp, cfg), tgt[:, 1:], w_mtp)
        loss = loss + tc.mtp_weight * mtp_ce + tc.balance_alpha * mbal
        metrics["mtp_ce"] = mtp_ce
        load = jnp.concatenate([load, mload[None]])
    metrics["load"] = load
    return loss, metrics


def step_settings(tc: TrainConfig) -> TrainConfig:
    """tc with the settings that never enter `train_step` (seed, data mix, answer weight, packing, the starting
    checkpoint) at their defaults: runs that differ only in those share one optimizer and one compiled step."""
    return dataclasses.replace(tc, seed=0, text_frac=0.3, answer_weight=2.0, pack_documents=True, init_from="")


@functools.cache  # one optimizer object per setting: train_step takes it as a static argument
def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, max(tc.steps, tc.warmup + 1),
                                               end_value=tc.lr * tc.min_lr_frac)
    # norms and the router bias are not decayed; the bias is not trained at all (updated by the balance rule)
    def decay_mask(p):
        return jax.tree_util.tree_map_with_path(lambda path, x: x.ndim >= 2, p)
    return optax.chain(optax.clip_by_global_norm(tc.clip),
                       optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask))


def update_router_bias(params: Params, load: jax.Array, gamma: float) -> Params:
    """b_i -= gamma * sign(load_i - mean load), per MoE layer (and the MTP layer, last row of load)."""
    def new_bias(bias, l):
        return (bias - gamma * jnp.sign(l - l.mean(-1, keepdims=True))).astype(bias.dtype)
    moe = params.moe_layers
    n = moe.ffn.e_bias.shape[0]
    params = params.replace(moe_layers=moe.replace(ffn=moe.ffn.replace(e_bias=new_bias(moe.ffn.e_bias, load[:n]))))
    if params.mtp is not None:
        f = params.mtp.layer.ffn
        params = params.replace(mtp=params.mtp.replace(layer=params.mtp.layer.replace(
            ffn=f.replace(e_bias=new_bias(f.e_bias, load[n])))))
    return params


def _zero_bias_grads(grads: Params) -> Params:
    grads = grads.replace(moe_layers=grads.moe_layers.replace(ffn=grads.moe_layers.ffn.replace(
        e_bias=jnp.zeros_like(grads.moe_layers.ffn.e_bias))))
    if grads.mtp is not None:
        f = grads.mtp.layer.ffn
        grads = grads.replace(mtp=grads.mtp.replace(layer=grads.mtp.layer.replace(
            ffn=f.replace(e_bias=jnp.zeros_like(f.e_bias)))))
    return grads


@partial(jax.jit, static_argnames=("cfg", "tc", "opt"), donate_argnames=("params", "opt_state"))
def train_step(params: Params, opt_state, tokens, cfg: Config, tc: TrainConfig, opt, segments=None, weights=None):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, cfg, tc, segments, weights)
    grads = _zero_bias_grads(grads)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = update_router_bias(params, metrics["load"], tc.bias_update_speed)
    load = metrics["load"]
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "imbalance": (load.max(-1) / load.mean(-1))}  # per layer, max/mean
    return params, opt_state, metrics
