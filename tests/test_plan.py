import pytest

from model import R1_671B, TINY
from sharding import make_mesh
from sharding.plan import compile_decode, plan


def test_671b_weight_bytes_per_recipe():
    mesh = make_mesh("expert=8")
    fp8 = plan(R1_671B, mesh, recipe="fp8", device_memory_gb=80)
    nvfp4 = plan(R1_671B, mesh, recipe="nvfp4", device_memory_gb=180)
    assert fp8["weights_total"] / 1e9 == pytest.approx(684.8, abs=0.5)  # the release, MTP included
    assert fp8["weights_main_model"] / 1e9 == pytest.approx(673.2, abs=0.5)
    assert nvfp4["weights_main_model"] / 1e9 == pytest.approx(396.7, abs=0.5)  # NVIDIA's R1-FP4, BF16 attention
    assert not fp8["fits"]  # 8 x 80 GB cannot hold the FP8 release
    assert plan(R1_671B, mesh, recipe="fp8", device_memory_gb=141)["fits"]
    assert nvfp4["fits"] and nvfp4["kv_tokens_total"] > 1_000_000
    # experts are split 8 ways, attention is replicated at tensor=1
    assert fp8["per_device"]["routed_experts"] == pytest.approx(653.9e9 * (1 + 4 / 128**2) / 8, rel=1e-3)


def test_plan_rejects_unknown_recipe_and_bad_mesh():
    with pytest.raises(ValueError, match="unknown recipe"):
        plan(R1_671B, make_mesh("expert=8"), recipe="int3")
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible"):
        plan(TINY, make_mesh("tensor=8"))


def test_compile_decode_reports_memory_and_collectives():
    mem, collectives, secs = compile_decode(TINY, make_mesh("expert=4,tensor=2"), batch=2, max_len=32)
    assert mem.argument_size_in_bytes > 0
    assert collectives["all-reduce"] > 0  # the expert-parallel psum at least


def test_plan_accepts_quant_recipes():
    """The published NVFP4 recipe with BF16 attention comes to ~396 GB for the main model, FP8 to ~673 GB; the FP8
    cache halves the bytes per token."""
    from model.config import R1_671B
    from sharding import make_mesh
    from sharding.plan import plan

    mesh = make_mesh("expert=8")
    r1 = plan(R1_671B, mesh, recipe="r1_fp4", device_memory_gb=180)
    fp8 = plan(R1_671B, mesh, recipe="fp8_w8a8", device_memory_gb=180)
    assert abs(r1["weights_main_model"] / 1e9 - 396.7) < 1.0
    assert abs(fp8["weights_main_model"] / 1e9 - 673.2) < 1.0
    assert r1["kv_bytes_per_token"] * 2 == fp8["kv_bytes_per_token"]
    more = plan(R1_671B, mesh, recipe="r1_fp4+attn", device_memory_gb=180)
    assert more["weights_main_model"] < r1["weights_main_model"]
    with pytest.raises(ValueError, match="unknown recipe"):
        plan(R1_671B, mesh, recipe="int3")
