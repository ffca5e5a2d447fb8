import json

import jax
import pytest

from model import R1_671B, SMALL, TINY, Config, abstract_params, param_counts
from model.config import RopeScaling
from model.params import param_bytes


def test_671b_counts_match_the_release():
    c = param_counts(R1_671B)
    assert c["total"] == 671_026_419_200  # HF's own count of the main model
    assert c["routed"] == 58 * 256 * 3 * 7168 * 2048
    groups = ("attention", "dense_mlp", "shared", "routed", "router", "embedding", "norm")
    assert sum(c[g] for g in groups) == c["total"]
    assert abs(c["mtp"] - 11.61e9) < 0.01e9
    assert abs(c["activated"] - 37.55e9) < 0.01e9
    assert abs(c["activated_matmul"] - 36.63e9) < 0.01e9


def test_671b_eval_shape_allocates_nothing():
    tree = abstract_params(R1_671B)
    leaves = jax.tree.leaves(tree)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n_main = sum(x.size for x in jax.tree.leaves(tree.replace(mtp=None)))
    assert n_main == 671_026_419_200
    assert tree.moe_layers.ffn.we1.shape == (58, 256, 7168, 2048)
    assert tree.dense_layers.ffn.w1.shape == (3, 7168, 18432)
    # bf16 everywhere except the float32 router bias (58 layers x 256)
    assert param_bytes(tree.replace(mtp=None)) == 2 * 671_026_419_200 + 2 * 58 * 256


def test_presets_have_every_feature():
    for cfg in (TINY, SMALL):
        assert cfg.n_group >= 2 and cfg.first_k_dense_replace >= 1 and cfg.n_shared_experts >= 1
        assert cfg.rope_scaling is not None
    assert 0.5e9 <= param_counts(SMALL)["total"] <= 1.0e9


def test_softmax_scale_with_yarn_mscale():
    assert R1_671B.softmax_scale == pytest.approx(0.1352337789, rel=1e-9)
    assert R1_671B.replace(rope_scaling=None).softmax_scale == pytest.approx(192 ** -0.5)


def test_loads_a_release_config_json(tmp_path):
    release = {
        "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280, "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "tie_word_embeddings": False,
        "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                              "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                              "type": "yarn"},
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
        "torch_dtype": "bfloat16", "num_nextn_predict_layers": 1,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(release))
    assert Config.from_json(path) == R1_671B


@pytest.mark.parametrize("change, needle", [
    (dict(n_routed_experts=15), "not divisible by n_group"),
    (dict(topk_group=5), "topk_group=5 exceeds n_group=4"),
    (dict(num_experts_per_tok=9), "exceeds the 2 selected groups x 4 experts"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(qk_rope_head_dim=7), "must be even"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(hidden_size=0), "hidden_size must be positive"),
])
def test_invalid_configs_raise(change, needle):
    with pytest.raises(ValueError, match=needle):
        TINY.replace(**change)


def test_rope_scaling_rejects_unknown_type():
    with pytest.raises(ValueError, match="only 'yarn'"):
        RopeScaling(type="linear")
