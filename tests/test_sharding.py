"""The model on 8 emulated CPU devices: every parameter split as the rules say, generation on meshes with a data
axis (odd batch and odd vocabulary padded inside) equal to one device, a non-default rules table, and clear
refusals. Sharded prefill and decode against one device, for every plan, are in tests/test_plans.py."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from model import TINY, ExecutionPlan, decode_step, generate, init_cache, prefill, shard_cache, shard_params
from model.placement import padded_vocab, param_specs
from sharding import ShardingRules, make_mesh, parse_mesh_spec
from tests.helpers import random_params, teacher_forced_logits
from tests.tolerances import rel_err

MESHES = ["expert=8", "data=2,expert=4", "expert=4,tensor=2", "data=2,expert=2,tensor=2"]
CFG = TINY.replace(vocab_size=517)  # no expert x tensor split divides it: the vocabulary is padded on the mesh


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=11)


def test_eight_devices_are_there():
    assert jax.device_count() == 8


@pytest.mark.parametrize("spec", MESHES)
def test_every_parameter_is_split_as_the_rules_say(params, spec):
    mesh = make_mesh(spec)
    sizes = parse_mesh_spec(spec)
    sp = shard_params(params, CFG, mesh)
    specs = param_specs(CFG)
    for (path, arr), (_, pspec) in zip(jax.tree_util.tree_flatten_with_path(sp)[0],
                                       jax.tree_util.tree_flatten_with_path(specs)[0]):
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, pspec), arr.ndim), jax.tree_util.keystr(path)
        want = list(arr.shape)
        for d, axes in enumerate(pspec):
            for a in ((axes,) if isinstance(axes, str) else (axes or ())):
                want[d] //= sizes[a]
        assert list(arr.addressable_shards[0].data.shape) == want, jax.tree_util.keystr(path)
    # the big tensors really are split (not silently replicated), the vocabulary padded to what the mesh divides
    n_dev = 8 // sizes["data"]
    assert sp.moe_layers.ffn.we1.addressable_shards[0].data.size * n_dev == sp.moe_layers.ffn.we1.size
    assert sp.embed.shape[0] == padded_vocab(CFG, mesh) == -(-517 // n_dev) * n_dev
    assert sp.embed.addressable_shards[0].data.size * n_dev == sp.embed.size


@pytest.mark.parametrize("spec", ["data=2,expert=4", "data=2,expert=2,tensor=2"])
def test_generate_pads_the_batch_and_the_vocabulary(params, spec):
    """Three prompts on data=2 (padded to four inside) and 517 tokens on every expert x tensor split (padded
    inside, logits sliced back): the same tokens as one device, never a padded id."""
    prompts = [list(range(5, 29)), list(range(40, 57)), [7, 8, 9]]
    sampling = dict(max_new_tokens=8)
    want = generate(params, CFG, prompts, **sampling).sequences()
    got = generate(shard_params(params, CFG, make_mesh(spec)), CFG, prompts, mesh=make_mesh(spec), **sampling)
    assert got.tokens.shape == (3, 8) and got.sequences() == want
    assert max(max(s) for s in want) < CFG.vocab_size


def test_a_non_default_rules_table_gives_the_same_logits(params):
    """Experts split over all 8 devices (expert x tensor) at full width, attention heads and the vocabulary
    replicated: another valid table, the same logits."""
    rules = ShardingRules.from_dict({"experts": ("expert", "tensor"), "expert_ffn": None, "heads": None,
                                     "vocab": None, "ffn": "tensor", "shared_ffn": None, "batch": "data"})
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 24)).astype(np.int32)
    lengths = np.array([24, 19])
    want = teacher_forced_logits(params, CFG, tokens, lengths, steps=2)
    plan = ExecutionPlan(mesh=make_mesh("expert=4,tensor=2"), rules=rules)
    got = teacher_forced_logits(params, CFG, tokens, lengths, steps=2, plan=plan)
    assert rel_err(got, want) < 1e-5
    assert plan.expert_parallel and plan.axes("experts") == ("expert", "tensor")


@pytest.mark.parametrize("spec, needle", [
    ("tensor=8", "num_attention_heads=4 is not divisible by mesh axes tensor of size 8"),
    ("data=8", "batch=2 is not divisible by mesh axes data of size 8"),
])
def test_mesh_that_does_not_divide_the_config_is_refused(params, spec, needle, monkeypatch):
    import sys
    fwd = sys.modules["model.forward"]
    monkeypatch.setattr(fwd, "_prefill", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled")))
    mesh = make_mesh(spec)
    with pytest.raises(ValueError, match=needle):
        prefill(params, init_cache(CFG, 2, 8), np.ones((2, 8), np.int32), np.array([8, 8]), cfg=CFG, mesh=mesh)


def test_expert_count_not_divisible_is_refused(params):
    mesh = make_mesh("expert=8")
    with pytest.raises(ValueError, match="n_routed_experts=12 is not divisible by mesh axes expert of size 8"):
        shard_params(params, CFG.replace(n_routed_experts=12, n_group=4), mesh)


def test_mesh_spec_errors():
    with pytest.raises(ValueError, match="unknown mesh axis 'pipeline'"):
        parse_mesh_spec("pipeline=2")
    with pytest.raises(ValueError, match="needs 16 devices, but 8 are available"):
        make_mesh("expert=16")
    with pytest.raises(ValueError, match=r"unknown mesh axes \['exprt'\]"):
        make_mesh({"exprt": 8})  # a misspelt axis in a dict is refused too, not a one-device mesh
    with pytest.raises(ValueError, match=r"mesh axes \['ep'\] that mesh"):
        ExecutionPlan(mesh=make_mesh("expert=8"), rules=ShardingRules.from_dict({"experts": "ep"}))


def test_decode_on_a_mesh_places_the_cache_by_the_rules(params):
    """A sharded cache stays split over the batch axis through a decode step (donated, updated in place)."""
    mesh = make_mesh("data=2,expert=4")
    sp = shard_params(params, CFG, mesh)
    cache = shard_cache(init_cache(CFG, 2, 16), mesh)
    _, cache = prefill(sp, cache, np.ones((2, 4), np.int32), np.array([4, 3]), cfg=CFG, mesh=mesh)
    _, cache = decode_step(sp, cache, np.array([1, 2]), cfg=CFG, mesh=mesh)
    assert cache.c_kv.addressable_shards[0].data.shape[1] == 1  # [L, B/2, S, C]
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5, 4])
    assert shard_cache(init_cache(CFG, 2, 16).replace(span=8), mesh).span == 8  # the read bound travels with it
