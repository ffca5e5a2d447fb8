import jax
import numpy as np
import pytest

from model import R1_671B, TINY, quantize_params
from model.memory import compile_decode, format_restore, plan, restore_plan
from quant import RECIPES, get_recipe, weight_bytes
from sharding import make_mesh
from tests.helpers import random_params


def test_671b_weight_bytes_per_recipe():
    mesh = make_mesh("expert=8")
    fp8 = plan(R1_671B, mesh, recipe="fp8_w8a8", device_memory_gb=80)
    r1 = plan(R1_671B, mesh, recipe="r1_fp4", device_memory_gb=180)
    assert fp8["weights_total"] / 1e9 == pytest.approx(684.8, abs=0.5)  # the release, MTP included
    assert fp8["weights_main_model"] / 1e9 == pytest.approx(673.2, abs=0.5)
    assert r1["weights_main_model"] / 1e9 == pytest.approx(396.7, abs=0.5)  # NVIDIA's R1-FP4, BF16 attention
    assert not fp8["fits"]  # 8 x 80 GB cannot hold the FP8 release
    assert plan(R1_671B, mesh, recipe="fp8_w8a8", device_memory_gb=141)["fits"]
    assert r1["fits"] and r1["kv_tokens_total"] > 1_000_000
    assert r1["kv_bytes_per_token"] * 2 == fp8["kv_bytes_per_token"]  # the FP8 cache
    # experts are split 8 ways, attention is replicated at tensor=1
    assert fp8["per_device"]["routed"] == pytest.approx(653.9e9 * (1 + 4 / 128**2) / 8, rel=1e-3)
    more = plan(R1_671B, mesh, recipe="r1_fp4+attn", device_memory_gb=180)
    assert more["weights_main_model"] < r1["weights_main_model"]
    # one name, one meaning: routed experts in NVFP4 on top of the FP8 release, planned and quantized alike
    experts = plan(R1_671B, mesh, recipe="nvfp4_experts", device_memory_gb=180)
    assert experts["per_device"]["attention"] == pytest.approx(fp8["per_device"]["attention"])
    assert experts["per_device"]["routed"] < 0.6 * fp8["per_device"]["routed"]


# nvfp4_search stores exactly what nvfp4_w4a16 stores (the search picks other scale values, not other arrays), and
# really quantizing with it compiles the search: left out
@pytest.mark.parametrize("recipe", [*(r for r in RECIPES if r != "nvfp4_search"), "r1_fp4+attn", "nvfp4_w4a16+attn_o"])
def test_planned_bytes_equal_the_quantized_tree(recipe):
    """The planner counts the bytes of the tree `quantize_params` makes (under eval_shape): on TINY with an MTP
    module, the planned total equals the bytes of the really quantized parameters, and split 8 ways the routed
    experts take an eighth per device."""
    cfg = TINY.replace(num_nextn_predict_layers=1)
    params = random_params(cfg, with_mtp=True)
    quantized = jax.jit(lambda p: quantize_params(p, cfg, recipe))(params)
    p = plan(cfg, make_mesh("expert=8"), recipe=recipe)
    assert p["weights_total"] == weight_bytes(quantized)
    routed = weight_bytes((quantized.moe_layers.ffn.we1, quantized.moe_layers.ffn.we3, quantized.moe_layers.ffn.we2))
    assert p["per_device"]["routed"] == routed / 8
    assert get_recipe(recipe).quantizes == (p["weights_total"] < weight_bytes(params))


def test_671b_restore_plan():
    """Restoring the converted FP8 release onto 8 devices: each reads its own shards (the plan's weights per
    device); replicated arrays are read once per device; the time is the bytes over the disk bandwidth; the
    device peak is the weights plus one MoE layer's shard (its 1/58 of the stack, the experts split 8 ways)."""
    mesh = make_mesh("expert=8")
    fp8 = plan(R1_671B, mesh, recipe="fp8_w8a8", device_memory_gb=141)
    r = restore_plan(R1_671B, mesh, recipe="fp8_w8a8", disk_gb_s=2.0)
    assert r["on_disk"] == fp8["weights_total"] and r["read_per_device"] == fp8["weights_per_device"]
    assert r["read_total"] == 8 * r["read_per_device"] and r["seconds"] == pytest.approx(r["read_total"] / 2e9)
    routed = fp8["per_device"]["routed"] / 58
    assert routed < r["layer_per_device"] < 1.1 * routed + fp8["per_device"]["attention"] / 61
    assert r["device_peak"] == r["read_per_device"] + r["layer_per_device"]
    assert "read per device" in format_restore(r)


def test_plan_rejects_unknown_recipe_and_bad_mesh():
    with pytest.raises(ValueError, match="unknown recipe"):
        plan(R1_671B, make_mesh("expert=8"), recipe="int3")
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible"):
        plan(TINY, make_mesh("tensor=8"))


def test_compile_decode_reports_memory_and_collectives():
    mem, collectives, secs = compile_decode(TINY, make_mesh("expert=4,tensor=2"), batch=2, max_len=32)
    assert mem.argument_size_in_bytes > 0
    assert collectives["all-reduce"] > 0  # the expert-parallel psum at least
    assert np.isfinite(secs)
