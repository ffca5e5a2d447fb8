"""The numbers the benchmarks divide by: bytes per decode step, expected distinct experts, and the products the
matrix-vector benchmarks time."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.bench import decode_bytes_per_step, expected_distinct_experts
from model.config import SMALL, TINY
from model.params import param_counts


@pytest.mark.parametrize("cfg", [TINY, SMALL], ids=["tiny", "small"])
def test_decode_bytes_at_batch_one_are_the_activated_weights(cfg):
    """One token reads DeepSeek's 'activated' parameters, except that the embedding is one row, not the table."""
    c = param_counts(cfg)
    item = jnp.dtype(cfg.param_dtype).itemsize
    want = (c["activated"] - c["embed"] + cfg.hidden_size) * item
    assert decode_bytes_per_step(cfg, 1) == pytest.approx(want, rel=1e-12)
    # a batch large enough touches every expert: the whole main model but the embedding table
    b = 4096
    assert decode_bytes_per_step(cfg, b) == pytest.approx((c["total"] - c["embed"] + b * cfg.hidden_size) * item,
                                                          rel=1e-6)


def test_expected_distinct_experts_matches_sampling():
    rng = np.random.default_rng(0)
    e, x = SMALL.n_routed_experts, SMALL.num_experts_per_tok
    for tokens in (1, 8, 32):
        trials = [len(np.unique(np.concatenate([rng.choice(e, x, replace=False) for _ in range(tokens)])))
                  for _ in range(2000)]
        assert np.mean(trials) == pytest.approx(expected_distinct_experts(SMALL, tokens), rel=0.02), tokens


def _script(name):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_matvec_forms_compute_the_same_product():
    mod = _script("bench_matvec")
    w = jax.random.normal(jax.random.key(0), (3, 16, 8), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (16,), jnp.float32)
    want = np.einsum("d,edm->m", np.asarray(x), np.asarray(w))
    for name, (fn, build) in mod.forms(3).items():
        got = np.asarray(fn(build(w), x))
        if name == "one dot":  # [E*M] products, one per expert row block
            got = got.reshape(3, 8).sum(0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bench_ours_times_every_layout():
    from types import SimpleNamespace

    from model.bench import MatvecBandwidth, bench_ours
    args = SimpleNamespace(batches=[1], decode_steps=2, repeats=1, prefill_lengths=[8])
    meter = MatvecBandwidth(n=256)
    out = bench_ours(TINY, None, args, bandwidth=meter, layouts=("stacked", "unstacked", "tp"), tp=2)
    assert set(out) == {("decode", 1), ("bw", 1), ("decode/u", 1), ("bw/u", 1), ("decode/tp", 1), ("bw/tp", 1),
                        ("prefill", 8)}
    assert all(v > 0 for v in out.values())


def _silu(v):
    return v / (1 + np.exp(-v))


def test_chains_compute_the_products_they_time():
    """scripts/bench_chains.py: with the outputs coupled back strongly (0.05 instead of 1e-30), every case's chain
    equals numpy's on each device's own slices, and each case holds about the byte budget per device."""
    from jax.sharding import Mesh
    mod = _script("bench_chains")
    d, budget = 16, 16 * 16 * 16 * 4  # one LM-head unit; 21 expert units
    mesh = Mesh(np.array(jax.devices()[:2]), ("t",))
    for name, (shapes, _) in mod.units(d).items():
        run, args, nbytes = mod.build(name, d, budget, mesh, couple=0.05)
        assert budget // 2 <= nbytes / 2 <= budget, name
        h, *ws = (np.asarray(a, np.float64) for a in args)
        got = np.asarray(run(*args))
        for dev in range(2):
            v = h[dev]
            mats = [w.reshape(2, -1, w.shape[-1])[dev] for w in ws]
            for i in range(0, len(mats), len(shapes)):
                unit = mats[i:i + len(shapes)]
                if name.startswith("experts"):
                    g, u, dn = unit
                    v = v + 0.05 * (((_silu(v @ g) * (v @ u)) @ dn) if "[in, out]" in name else
                                    dn @ (_silu(g @ v) * (u @ v)))
                elif name.strip().startswith("in "):  # independent products, summed
                    v = v + 0.05 * np.sum([v @ w for w in unit], axis=0)[:1]
                else:
                    (w,) = unit
                    y = v @ w if "x @ W" in name else w @ np.tile(v, w.shape[1] // d)
                    v = v + 0.05 * y[:1]
            assert np.isfinite(v).all(), name
            np.testing.assert_allclose(got[dev], v, rtol=1e-4, atol=1e-4 * np.abs(v).max(), err_msg=name)


def _open_fds_to(path: Path) -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if fd.exists() and fd.resolve() == path.resolve())


def test_idle_polling_holds_a_zero_request_only_inside_the_block(tmp_path):
    """The request is the 32-bit integer 0 written to the file, which stays open (the kernel keeps the request
    only while it is open) for the block and is closed after it, also when the block raises."""
    from model.bench import idle_polling
    qos = tmp_path / "cpu_dma_latency"
    qos.write_bytes(b"\xff" * 4)
    with idle_polling(str(qos)) as idle:
        assert idle.held and str(qos) in idle.detail
        assert _open_fds_to(qos) == 1
    assert qos.read_bytes() == np.int32(0).tobytes()
    assert _open_fds_to(qos) == 0
    with pytest.raises(RuntimeError), idle_polling(str(qos)):
        raise RuntimeError("the body's error goes through")
    assert _open_fds_to(qos) == 0


def test_idle_polling_without_access_changes_nothing_and_says_why(tmp_path):
    from model.bench import idle_polling
    missing = tmp_path / "no" / "cpu_dma_latency"
    with idle_polling(str(missing)) as idle:
        assert not idle.held
        assert idle.detail.startswith("default") and str(missing) in idle.detail
    assert not missing.exists()
