"""What the router did, as an extra output of `prefill` / `decode_step` (routing=True), and its statistics.

`Routed` is the router's decision for every token of every MoE layer: expert ids and combine weights, [Lm, B, T, X].
`routing_stats` counts it into `RoutingStats`: per layer, token-expert pairs per expert [Lm, E] and tokens that
reached each expert group [Lm, G], with the entropy, imbalance and group usage derived from them. Counts add, so
statistics over many batches are the sum of each batch's.

The router's decision is already computed on the way (model/moe.py, `route`); asking for it only keeps it instead
of dropping it, and without routing=True the compiled programs are the ones they were without this module.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from model.config import Config


@struct.dataclass
class Routed:
    """The router's choice per MoE layer: experts [Lm, B, T, X] int32 (global expert ids), weights [Lm, B, T, X]
    float32 (the combine weights, after normalisation and routed_scaling_factor)."""
    experts: jax.Array
    weights: jax.Array


@struct.dataclass
class RoutingStats:
    """Counts over the tokens seen: expert_counts [Lm, E] token-expert pairs per expert; group_tokens [Lm, G]
    tokens that chose at least one expert in group g; tokens: how many tokens were counted (a scalar)."""
    expert_counts: jax.Array
    group_tokens: jax.Array
    tokens: jax.Array

    def __add__(self, other: RoutingStats) -> RoutingStats:
        return jax.tree.map(jnp.add, self, other)

    @property
    def load(self) -> jax.Array:
        """[Lm, E]: each expert's share of the pairs (sums to 1 per layer)."""
        c = self.expert_counts.astype(jnp.float32)
        return c / jnp.maximum(c.sum(-1, keepdims=True), 1.0)

    @property
    def entropy(self) -> jax.Array:
        """[Lm]: entropy of the load in bits; log2(E) when every expert gets the same share."""
        p = self.load
        return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0), -1)

    @property
    def imbalance(self) -> jax.Array:
        """[Lm]: the busiest expert's count over the mean count (1 is perfectly balanced; E / X at worst)."""
        c = self.expert_counts.astype(jnp.float32)
        return c.max(-1) / jnp.maximum(c.mean(-1), 1e-9)

    @property
    def group_usage(self) -> jax.Array:
        """[Lm, G]: the fraction of tokens that routed into each group (each token uses up to topk_group)."""
        return self.group_tokens.astype(jnp.float32) / jnp.maximum(self.tokens.astype(jnp.float32), 1.0)

    def table(self, first_layer: int = 0) -> str:
        """One line per MoE layer: entropy (bits, of its maximum), imbalance, busiest and idle experts."""
        counts = np.asarray(self.expert_counts)
        e = counts.shape[-1]
        lines = [f"{'layer':>5} {'entropy bits':>12} {'of max':>7} {'max/mean':>9} {'busiest':>8} {'idle':>5}"]
        for i, (h, m, c) in enumerate(zip(np.asarray(self.entropy), np.asarray(self.imbalance), counts)):
            lines.append(f"{first_layer + i:5d} {h:12.3f} {h / np.log2(e):7.1%} {m:9.2f} {int(c.argmax()):8d} "
                         f"{int((c == 0).sum()):5d}")
        return "\n".join(lines)


def token_mask(lengths, t: int) -> jax.Array:
    """[B, T] bool: the real tokens of right-padded prompts (what `prefill`'s lengths say)."""
    return jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]


@partial(jax.jit, static_argnames=("cfg",))
def routing_stats(routed: Routed, cfg: Config, mask=None) -> RoutingStats:
    """Count `routed` (from prefill / decode_step with routing=True) over the tokens where mask [B, T] is true
    (default: all; for prefill, token_mask(lengths, T) leaves the padding out)."""
    lm, b, t, _ = routed.experts.shape
    e, g = cfg.n_routed_experts, cfg.n_group
    m = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask, bool)
    w = jnp.broadcast_to(m[None, :, :, None], routed.experts.shape).astype(jnp.int32)
    layer = jnp.broadcast_to(jnp.arange(lm)[:, None, None, None], routed.experts.shape)
    counts = jnp.zeros((lm, e), jnp.int32).at[layer, routed.experts].add(w)  # a scatter, not a [.., E] one-hot
    in_group = jax.nn.one_hot(routed.experts // (e // g), g, dtype=bool).any(-2)  # [Lm, B, T, G]
    group_tokens = (in_group & m[None, :, :, None]).sum((1, 2), dtype=jnp.int32)
    return RoutingStats(expert_counts=counts, group_tokens=group_tokens, tokens=m.sum(dtype=jnp.int32))
