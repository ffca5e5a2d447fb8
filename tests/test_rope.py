import math

import jax.numpy as jnp
import numpy as np

from model import R1_671B, TINY
from model.rope import apply_rope, rope_inv_freq


def test_yarn_ramp_bounds_for_671b():
    f = rope_inv_freq(R1_671B).astype(np.float64)
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    ratio = f / base
    np.testing.assert_allclose(ratio[:11], 1.0, rtol=1e-6)  # dims 0..10 unchanged
    np.testing.assert_allclose(ratio[23:], 1 / 40, rtol=1e-6)  # dims 23..31 divided by the factor
    assert np.all((ratio[11:23] < 1) & (ratio[11:23] > 1 / 40))


def test_rotation_is_interleaved_pairs_against_complex_numbers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, TINY.qk_rope_head_dim)).astype(np.float32)
    pos = np.tile(np.arange(100, 105), (2, 1))
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), TINY))
    f = rope_inv_freq(TINY).astype(np.float64)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * pos[:, :, None, None] * f)
    want = np.stack([z.real, z.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert math.isclose(float(np.abs(got).sum()), float(np.abs(want).sum()), rel_tol=1e-5)
