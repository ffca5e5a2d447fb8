"""The roofline model (model/roofline.py): its bytes are the planner's, its expert coverage the closed form, its
batch-1 bound the arithmetic of the whole model over the node's bandwidth, and every published figure has a
prediction within 30% at the calibrated efficiencies (or above a figure published as a lower bound)."""

import jax
import numpy as np
import pytest

from model import roofline as R
from model.config import R1_671B
from model.memory import quantized_abstract
from model.params import param_counts


@pytest.fixture(scope="module")
def fp4():
    return R.model_bytes(R1_671B, "r1_fp4")


def test_class_bytes_add_up_to_the_planned_tree(fp4):
    cfg = R1_671B
    tree = quantized_abstract(cfg, "r1_fp4")
    total = sum(a.size * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
    embed = tree.embed.size * np.dtype(tree.embed.dtype).itemsize
    ours = (cfg.num_hidden_layers * fp4.attention + fp4.dense + cfg.n_moe_layers * (fp4.shared + cfg.n_routed_experts
            * fp4.expert) + fp4.router + fp4.head + fp4.mtp_fixed + cfg.n_routed_experts * fp4.mtp_expert)
    assert ours + embed == total
    counts = param_counts(cfg)
    assert dict(fp4.params)["expert"] == 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert cfg.num_hidden_layers * dict(fp4.params)["attention"] == counts["attention"]
    assert dict(fp4.dtypes) == {"attention": "bf16", "dense": "fp4", "shared": "fp4", "expert": "fp4",
                                "router": "bf16", "head": "bf16", "mtp": "bf16"}


def test_expert_coverage_is_the_closed_form():
    got = [R.distinct_experts(R1_671B, t) for t in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    np.testing.assert_allclose(got, [8, 15.75, 30.5, 57.4, 102.0, 163.0, 222.0, 252.0, 256.0], atol=0.6)


def test_the_batch_one_bound_is_the_bytes_over_the_bandwidth(fp4):
    cfg, hw = R1_671B, R.HARDWARE["B200"]
    s = R.decode_step(cfg, fp4, hw, R.Point(batch=1, context=2048))
    weights = (cfg.num_hidden_layers * fp4.attention + fp4.dense + cfg.n_moe_layers * (fp4.shared + 8 * fp4.expert)
               + fp4.router + fp4.head)
    assert s.weight_bytes == pytest.approx(weights)
    assert s.seconds == pytest.approx((weights + s.kv_bytes) / (8 * 8e12) + s.comm_s)
    assert 37e9 < weights < 40e9 and s.tokens_per_s_user == pytest.approx(1 / s.seconds)
    # MTP: k draft passes more to read and more tokens per step; the accepted length multiplies the rate
    m = R.decode_step(cfg, fp4, hw, R.Point(batch=1, context=2048, mtp_depth=2, acceptance=(0.9, 0.5)))
    assert m.weight_bytes > s.weight_bytes and m.tokens_per_s_user == pytest.approx((1 + 0.9 + 0.45) / m.seconds)
    # a full node of data-parallel attention reads every expert once and a copy of the rest per device
    big = R.decode_step(cfg, fp4, hw, R.Point(batch=4096, context=2048, attention="dp"))
    assert big.weight_bytes > cfg.n_moe_layers * 255 * fp4.expert + 8 * cfg.num_hidden_layers * fp4.attention


def test_every_published_figure_within_30_percent_calibrated():
    rows = R.compare(R1_671B)
    assert len(rows) == len(R.ANCHORS)
    for r in rows:
        assert abs(r["calibrated_error"]) <= 0.30, r
        assert r["ideal_error"] > 0 or r["at_least"], r  # the ideal bound is above every figure


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="give one acceptance per draft"):
        R.Point(batch=1, context=1, mtp_depth=2, acceptance=(0.5,))
    with pytest.raises(ValueError, match="attention must be 'tp' or 'dp'"):
        R.Point(batch=1, context=1, attention="ep")
