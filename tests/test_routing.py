"""Routing statistics: an extra output of prefill / decode_step that leaves the logits alone and counts what a
plain numpy recount of the router's choices counts."""

import jax.numpy as jnp
import numpy as np

from model import decode_step, init_cache, prefill, routing_stats, token_mask
from model.forward import forward
from model.plan import ExecutionPlan


def numpy_recount(experts, mask, cfg):
    """experts [Lm, B, T, X], mask [B, T] -> (counts [Lm, E], group tokens [Lm, G], tokens), by loops."""
    lm, e, g = experts.shape[0], cfg.n_routed_experts, cfg.n_group
    counts, groups = np.zeros((lm, e), int), np.zeros((lm, g), int)
    for layer in range(lm):
        for b, t in zip(*np.nonzero(mask)):
            ids = experts[layer, b, t]
            np.add.at(counts[layer], ids, 1)
            groups[layer, np.unique(ids // (e // g))] += 1
    return counts, groups, int(mask.sum())


def test_routing_is_an_extra_output_and_counts_like_numpy(bundled_model):
    params, cfg, tok = bundled_model
    texts = ["def f(x):\n    return x + 1\n", "Ann has 12 pens and gets 7 more.", "The module"]
    ids = [tok.encode(s, add_bos=True) for s in texts]
    t = max(map(len, ids))
    tokens = np.array([i + [0] * (t - len(i)) for i in ids])
    lengths = np.array([len(i) for i in ids])
    plain, _ = prefill(params, init_cache(cfg, 3, t + 8), tokens, lengths, cfg=cfg)
    logits, cache, routed = prefill(params, init_cache(cfg, 3, t + 8), tokens, lengths, cfg=cfg, routing=True)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))  # collecting changes nothing
    lm = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert routed.experts.shape == routed.weights.shape == (lm, 3, t, cfg.num_experts_per_tok)
    np.testing.assert_allclose(np.asarray(routed.weights).sum(-1), cfg.routed_scaling_factor, rtol=1e-5)

    mask = np.asarray(token_mask(lengths, t))
    stats = routing_stats(routed, cfg, mask)
    counts, groups, n = numpy_recount(np.asarray(routed.experts), mask, cfg)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), counts)
    np.testing.assert_array_equal(np.asarray(stats.group_tokens), groups)
    assert int(stats.tokens) == n == lengths.sum()
    p = counts / counts.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), -1)
    np.testing.assert_allclose(np.asarray(stats.entropy), entropy, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.imbalance), counts.max(-1) / counts.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.group_usage), groups / n, rtol=1e-6)
    assert "entropy" in stats.table(cfg.first_k_dense_replace)
    # the wrong twin: the padding counted as tokens
    assert not np.array_equal(np.asarray(routing_stats(routed, cfg).expert_counts), counts)

    # counts add: one prompt at a time sums to the batch
    parts = [routing_stats(routed.replace(experts=routed.experts[:, i:i + 1], weights=routed.weights[:, i:i + 1]),
                           cfg, mask[i:i + 1]) for i in range(3)]
    np.testing.assert_array_equal(np.asarray((parts[0] + parts[1] + parts[2]).expert_counts), counts)

    # an independent count: the train phase's expert load on the first prompt, unpadded
    n0 = lengths[0]
    _, _, (load, _) = forward(params, None, jnp.asarray(tokens[:1, :n0]), jnp.arange(n0)[None], None, cfg,
                              ExecutionPlan(), "train")
    np.testing.assert_array_equal(np.asarray(load).astype(int), np.asarray(parts[0].expert_counts))

    # decode: one token per sequence, its routing beside unchanged logits
    step_plain, _ = decode_step(params, cache, np.array([5, 6, 7]), cfg=cfg)
    _, cache2, _ = prefill(params, init_cache(cfg, 3, t + 8), tokens, lengths, cfg=cfg, routing=True)
    step, _, r = decode_step(params, cache2, np.array([5, 6, 7]), cfg=cfg, routing=True)
    np.testing.assert_array_equal(np.asarray(step), np.asarray(step_plain))
    assert r.experts.shape == (lm, 3, 1, cfg.num_experts_per_tok)
    assert int(routing_stats(r, cfg).expert_counts.sum()) == lm * 3 * cfg.num_experts_per_tok
