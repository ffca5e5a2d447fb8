"""Sharded execution on 8 emulated CPU devices equals the single-device model."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from model import TINY, decode_step, generate, init_cache, prefill
from sharding import make_mesh, param_specs, parse_mesh_spec, shard_cache, shard_params
from tests.helpers import random_params
from tests.tolerances import rel_err

MESHES = ["expert=8", "data=2,expert=4", "expert=4,tensor=2", "data=2,expert=2,tensor=2"]
CFG = TINY


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=11)


@pytest.fixture(scope="module")
def reference(params):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, size=(2, 24)).astype(np.int32)
    lengths = np.array([24, 17])
    cache = init_cache(CFG, 2, 40)
    logits, cache = prefill(params, cache, tokens, lengths, cfg=CFG)
    steps, nxt = [np.asarray(logits)], np.argmax(np.asarray(logits), -1)
    for _ in range(4):
        logits, cache = decode_step(params, cache, nxt, cfg=CFG)
        steps.append(np.asarray(logits))
        nxt = np.argmax(np.asarray(logits), -1)
    gen = generate(params, CFG, [tokens[0].tolist(), tokens[1, :17].tolist()], max_new_tokens=8).sequences()
    return tokens, lengths, steps, gen


def test_eight_devices_are_there():
    assert jax.device_count() == 8


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_prefill_decode_and_generate_match_single_device(params, reference, spec):
    tokens, lengths, want, want_gen = reference
    mesh = make_mesh(spec)
    sp = shard_params(params, CFG, mesh)
    cache = shard_cache(init_cache(CFG, 2, 40), mesh)
    logits, cache = prefill(sp, cache, tokens, lengths, cfg=CFG, mesh=mesh)
    got = [np.asarray(logits)]
    for i in range(4):
        nxt = np.argmax(want[i], -1)
        logits, cache = decode_step(sp, cache, nxt, cfg=CFG, mesh=mesh)
        got.append(np.asarray(logits))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    gen = generate(sp, CFG, [tokens[0].tolist(), tokens[1, :17].tolist()], max_new_tokens=8, mesh=mesh).sequences()
    assert gen == want_gen


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
    # the big tensors really are split (not silently replicated)
    n_dev = 8 // sizes["data"]
    assert sp.moe_layers.ffn.we1.addressable_shards[0].data.size * n_dev == sp.moe_layers.ffn.we1.size
    assert sp.embed.addressable_shards[0].data.size * n_dev == sp.embed.size


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


@pytest.mark.parametrize("spec", MESHES)
def test_all_to_all_dispatch_matches_single_device(params, reference, spec):
    """Prefill with tokens sent to the ranks that own their experts (all_to_all there and back), dropless."""
    from sharding import EPMesh
    tokens, lengths, want, _ = reference
    mesh = make_mesh(spec)
    ep = EPMesh(mesh, dispatch="all_to_all")
    sp = shard_params(params, CFG, ep)
    logits, cache = prefill(sp, shard_cache(init_cache(CFG, 2, 40), ep), tokens, lengths, cfg=CFG, mesh=ep)
    assert rel_err(logits, want[0]) < 1e-5
    # "auto" uses all_to_all for the prefill (48 tokens) and psum for the 2-token decode step
    auto = EPMesh(mesh, dispatch="auto", a2a_min_tokens=4)
    logits, cache = prefill(sp, shard_cache(init_cache(CFG, 2, 40), auto), tokens, lengths, cfg=CFG, mesh=auto)
    logits, cache = decode_step(sp, cache, np.argmax(want[0], -1), cfg=CFG, mesh=auto)
    assert rel_err(logits, want[1]) < 1e-5
