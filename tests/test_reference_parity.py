"""Parity with HuggingFace transformers' DeepSeek-V3 (fixture made by scripts/make_reference_fixture.py).

The fixture is a tiny random model (YaRN on with original context 128, 4 expert groups, a dense first layer, a
shared expert, random norms and router bias) with HF's float32 logits for prompts of 320 and 400 tokens and its
greedy continuations. No torch is needed here. Each check has a deliberately wrong twin that must fail.
"""

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from model import Config, decode_step, generate, init_cache, prefill
from model.io.hf_checkpoint import load_hf_checkpoint
from tests.helpers import fresh_jit_caches
from tests.tolerances import assert_logits_close, rel_err

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny"
TOL = 1e-4  # max |ours - ref| <= 1e-4 * max |ref|


@pytest.fixture(scope="module")
def model():
    params, cfg = load_hf_checkpoint(FIXTURE)
    return params, cfg


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE / "reference.npz"))


def our_logits(params, cfg, ids):
    cache = init_cache(cfg, 1, len(ids))
    logits, _ = prefill(params, cache, ids[None], np.array([len(ids)]), cfg=cfg, all_logits=True)
    return np.asarray(logits[0])


def test_fixture_exercises_yarn(model, ref):
    _, cfg = model
    assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position_embeddings == 128
    assert min(len(ref[k]) for k in ref if k.startswith("prompt_")) >= 300
    assert cfg.n_group >= 2 and cfg.first_k_dense_replace == 1 and cfg.n_shared_experts == 1


@pytest.mark.parametrize("i", [0, 1])
def test_prefill_logits_match_hf(model, ref, i):
    params, cfg = model
    ours = our_logits(params, cfg, ref[f"prompt_{i}"])
    assert rel_err(ours, ref[f"logits_{i}"]) <= TOL


@pytest.mark.parametrize("i", [0, 1])
def test_greedy_continuation_matches_hf(model, ref, i):
    params, cfg = model
    out = generate(params, cfg, [ref[f"prompt_{i}"].tolist()], max_new_tokens=len(ref[f"greedy_{i}"]))
    assert out.tokens[0].tolist() == ref[f"greedy_{i}"].tolist()


def decode_logits(params, cfg, ids, n0, shift=0):
    """Prefill ids[:n0], then decode ids[n0:] one at a time (absorbed form); logits at positions n0 .. end-1."""
    cache = init_cache(cfg, 1, len(ids) + 1)
    _, cache = prefill(params, cache, ids[None, :n0], np.array([n0]), cfg=cfg)
    cache = dataclasses.replace(cache, lengths=cache.lengths + shift)
    out = []
    for t in range(n0, len(ids)):
        logits, cache = decode_step(params, cache, ids[None, t], cfg=cfg, check=False)
        out.append(np.asarray(logits[0]))
    return np.stack(out)


def test_absorbed_decode_matches_hf(model, ref):
    params, cfg = model
    ids = ref["prompt_0"]
    ours = decode_logits(params, cfg, ids, 300)
    assert_logits_close(ours, ref["logits_0"][300:])


# ---- sensitivity twins: each deliberately wrong variant must fail the same check ---------------------------------

def test_twin_off_by_one_cache_position_fails(model, ref):
    params, cfg = model
    ids = ref["prompt_0"]
    wrong = decode_logits(params, cfg, ids, 300, shift=1)
    assert rel_err(wrong, ref["logits_0"][300:]) > TOL


def _half_rotation_rope(x, positions, cfg):
    """Wrong layout: rotates (first half, second half) pairs instead of DeepSeek's interleaved pairs."""
    from model.rope import rope_inv_freq
    inv = jnp.asarray(rope_inv_freq(cfg))
    ang = positions.astype(jnp.float32)[..., None] * inv
    ang = ang.reshape(*ang.shape[:2], *([1] * (x.ndim - 3)), ang.shape[-1])
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x2 * jnp.cos(ang) + x1 * jnp.sin(ang)],
                           -1).astype(x.dtype)


def _no_yarn_rope(x, positions, cfg):
    from model.rope import apply_rope
    return apply_rope(x, positions, cfg.replace(rope_scaling=None))


@pytest.mark.parametrize("twin", ["softmax_scale_without_mscale", "half_rotation_rope", "rope_without_yarn"])
def test_twins_fail_prefill_parity(model, ref, twin, monkeypatch):
    params, cfg = model
    if twin == "softmax_scale_without_mscale":
        monkeypatch.setattr(Config, "softmax_scale", property(lambda self: self.qk_head_dim ** -0.5))
    elif twin == "half_rotation_rope":
        monkeypatch.setattr("model.mla.apply_rope", _half_rotation_rope)
    else:
        monkeypatch.setattr("model.mla.apply_rope", _no_yarn_rope)
    fresh_jit_caches()
    try:
        wrong = our_logits(params, cfg, ref["prompt_1"])
    finally:
        monkeypatch.undo()
        fresh_jit_caches()
    assert rel_err(wrong, ref["logits_1"]) > TOL
