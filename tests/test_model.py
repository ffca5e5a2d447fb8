import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import TINY, SamplingParams, decode_step, generate, init_cache, prefill
from tests.helpers import random_params
from tests.tolerances import assert_logits_close, rel_err

CFG = TINY


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=7)


def teacher_forced(params, tokens, n_prefill, cache_lengths_shift=0):
    """Prefill n_prefill tokens, then feed the rest one at a time; logits for positions n_prefill-1 ..."""
    cache = init_cache(CFG, 1, len(tokens))
    logits, cache = prefill(params, cache, tokens[None, :n_prefill], np.array([n_prefill]), cfg=CFG)
    out = [np.asarray(logits[0])]
    if cache_lengths_shift:
        cache = dataclasses.replace(cache, lengths=cache.lengths + cache_lengths_shift)
    for t in range(n_prefill, len(tokens) - cache_lengths_shift):
        logits, cache = decode_step(params, cache, tokens[None, t], cfg=CFG, check=False)
        out.append(np.asarray(logits[0]))
    return np.stack(out)


def full_prefill_logits(params, tokens):
    cache = init_cache(CFG, 1, len(tokens))
    logits, _ = prefill(params, cache, tokens[None], np.array([len(tokens)]), cfg=CFG, all_logits=True)
    return np.asarray(logits[0])


@pytest.fixture(scope="module")
def long_tokens():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, size=512).astype(np.int32)


def test_prefill_equals_teacher_forced_decode(params, long_tokens):
    """512 positions, 480 of them through the absorbed decode path: far past YaRN's original context (128)."""
    full = full_prefill_logits(params, long_tokens)
    n0 = 32
    dec = teacher_forced(params, long_tokens, n0)
    assert_logits_close(dec, full[n0 - 1:])


def test_off_by_one_cache_position_is_detected(params, long_tokens):
    full = full_prefill_logits(params, long_tokens[:160])
    dec = teacher_forced(params, long_tokens[:160], 32, cache_lengths_shift=1)
    assert rel_err(dec[1:], full[32:160 - 1]) > 1e-3


def test_ragged_batch_equals_each_alone(params):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in (5, 40, 17)]
    batched = generate(params, CFG, prompts, max_new_tokens=12)
    for i, p in enumerate(prompts):
        alone = generate(params, CFG, [p], max_new_tokens=12)
        assert batched.sequences()[i] == alone.sequences()[0]
    # the logits too, not just the argmax
    cache = init_cache(CFG, 3, 64)
    tok = np.zeros((3, 40), np.int32)
    for i, p in enumerate(prompts):
        tok[i, :len(p)] = p
    lb, _ = prefill(params, cache, tok, np.array([5, 40, 17]), cfg=CFG)
    for i, p in enumerate(prompts):
        la, _ = prefill(params, init_cache(CFG, 1, 64), np.array([p]), np.array([len(p)]), cfg=CFG)
        assert rel_err(lb[i], la[0]) < 1e-5


def test_seeded_sampling_is_reproducible(params):
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=11)
    a = generate(params, CFG, prompts, max_new_tokens=16, sampling=sp).sequences()
    b = generate(params, CFG, prompts, max_new_tokens=16, sampling=sp).sequences()
    c = generate(params, CFG, prompts, max_new_tokens=16, sampling=dataclasses.replace(sp, seed=12)).sequences()
    assert a == b
    assert a != c
    # a request samples the same tokens alone as in a batch, given its request id
    alone = generate(params, CFG, [prompts[1]], max_new_tokens=16, sampling=sp, request_ids=[1]).sequences()
    assert alone[0] == a[1]


def test_top_k_one_is_greedy(params):
    prompts = [[1, 2, 3, 4]]
    greedy = generate(params, CFG, prompts, max_new_tokens=10).sequences()
    topk1 = generate(params, CFG, prompts, max_new_tokens=10,
                     sampling=SamplingParams(temperature=0.7, top_k=1, seed=3)).sequences()
    assert greedy == topk1


def test_each_sequence_stops_on_its_own(params):
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    free = generate(params, CFG, prompts, max_new_tokens=12)
    stop = free.tokens[0, 4]  # the first sequence's fifth token
    out = generate(params, CFG, prompts, max_new_tokens=12, stop_tokens=[int(stop)])
    first = list(free.tokens[0]).index(stop)
    assert out.num_generated[0] == first + 1 and out.stopped[0]
    assert out.sequences()[0] == free.tokens[0, :first].tolist()
    assert np.all(out.tokens[0, first + 1:] == -1)
    if stop not in free.tokens[1]:
        assert out.sequences()[1] == free.sequences()[1] and not out.stopped[1]


def test_bad_inputs_raise_before_compiling(params, monkeypatch):
    import sys
    fwd, gen = sys.modules["model.forward"], sys.modules["model.generate"]

    def boom(*a, **k):
        raise AssertionError("compiled despite bad input")
    monkeypatch.setattr(fwd, "_prefill", boom)
    monkeypatch.setattr(gen, "_generate_loop", boom)
    with pytest.raises(ValueError, match=r"out of the vocabulary \[0, 512\): \[512\]"):
        generate(params, CFG, [[1, 512]], max_new_tokens=3)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        generate(params, CFG, [[1, -1]], max_new_tokens=3)
    with pytest.raises(ValueError, match="stop token ids out of the vocabulary"):
        generate(params, CFG, [[1, 2]], max_new_tokens=3, stop_tokens=[9999])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(params, CFG, [[1], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        generate(params, CFG, [[1]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        generate(params, CFG, [list(range(500))], max_new_tokens=20)
    with pytest.raises(ValueError, match="exceeds the cache length 64"):
        generate(params, CFG, [[1] * 60], max_new_tokens=5, max_len=64)
    cache = init_cache(CFG, 1, 16)
    with pytest.raises(ValueError, match="longer than the cache"):
        prefill(params, cache, np.ones((1, 17), np.int32), np.array([17]), cfg=CFG)
    with pytest.raises(ValueError, match="empty prompt"):
        prefill(params, cache, np.ones((1, 4), np.int32), np.array([0]), cfg=CFG)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        decode_step(params, cache, np.array([600]), cfg=CFG)
    for span, n in ((4, 4), (32, 0)):  # a read bound short of the step's position, or past the cache
        with pytest.raises(ValueError, match=f"the cache's span {span} must hold position {n}, which this step "
                                             f"reads, and lie within the cache \\(16 positions\\)"):
            decode_step(params, cache.replace(span=span, lengths=np.array([n], np.int32)), np.array([5]), cfg=CFG)


def test_max_new_tokens_zero_and_full_cache(params):
    out = generate(params, CFG, [[1, 2]], max_new_tokens=0)
    assert out.sequences() == [[]]
    cache = init_cache(CFG, 1, 4)
    _, cache = prefill(params, cache, np.array([[1, 2, 3, 4]]), np.array([4]), cfg=CFG)
    with pytest.raises(ValueError, match="cache is full"):
        decode_step(params, cache, np.array([5]), cfg=CFG)


def test_bfloat16_model_tracks_float32(params):
    """Same weights in bf16: a precision smoke test, not parity. bf16 rounding (2^-8 relative per op) can flip a
    near-tied expert choice, which moves logits discontinuously, so the bound is loose; the top token must hold."""
    cfg16 = CFG.replace(dtype="bfloat16")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 and a.ndim > 1 else a, params)
    toks = np.random.default_rng(3).integers(0, CFG.vocab_size, size=(1, 64)).astype(np.int32)
    l32, _ = prefill(params, init_cache(CFG, 1, 64), toks, np.array([64]), cfg=CFG)
    l16, _ = prefill(p16, init_cache(cfg16, 1, 64), toks, np.array([64]), cfg=cfg16)
    assert rel_err(l16, l32) < 1e-1
    assert int(jnp.argmax(l16)) == int(jnp.argmax(l32))


def test_greedy_pick_equals_argmax():
    """The max-then-min greedy pick is jnp.argmax: first index on ties, a NaN counts as the largest."""
    from model.sampling import greedy
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 300)).astype(np.float32)
    x[1, [7, 250]] = 9.0  # a tie: the first wins
    x[2, :] = 0.0
    x[3, [11, 40]] = np.nan
    x[4, 5] = np.inf
    x[5, :] = -np.inf
    np.testing.assert_array_equal(np.asarray(greedy(jnp.asarray(x))), np.asarray(jnp.argmax(jnp.asarray(x), -1)))
    assert greedy(jnp.asarray(x)).dtype == jnp.int32
