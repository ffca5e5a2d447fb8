"""The benchmark helpers (scripts/bench_util.py): the bytes a decode step reads, the expected distinct experts, the
timing harness, and idle cores polling for a run."""

import importlib.util
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from model.config import SMALL, TINY
from model.params import param_counts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
BENCH = importlib.import_module("bench_util")
decode_bytes_per_step, expected_distinct_experts = BENCH.decode_bytes_per_step, BENCH.expected_distinct_experts


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


def test_bench_ours_times_decode_and_prefill():
    from types import SimpleNamespace

    args = SimpleNamespace(batches=[1], decode_steps=2, repeats=1, prefill_lengths=[8])
    meter = BENCH.MatvecBandwidth(n=256)
    out = BENCH.bench_ours(TINY, None, args, bandwidth=meter)
    assert set(out) == {("decode", 1), ("bw", 1), ("prefill", 8)}
    assert all(v > 0 for v in out.values())


def _open_fds_to(path: Path) -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if fd.exists() and fd.resolve() == path.resolve())


def test_idle_polling_holds_a_zero_request_only_inside_the_block(tmp_path):
    """The request is the 32-bit integer 0 written to the file, which stays open (the kernel keeps the request
    only while it is open) for the block and is closed after it, also when the block raises."""
    idle_polling = BENCH.idle_polling
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
    idle_polling = BENCH.idle_polling
    missing = tmp_path / "no" / "cpu_dma_latency"
    with idle_polling(str(missing)) as idle:
        assert not idle.held
        assert idle.detail.startswith("default") and str(missing) in idle.detail
    assert not missing.exists()
