"""Two processes of four CPU devices each (gloo collectives) form one 8-device mesh: same logits as one process."""

import jax
import numpy as np

from model.config import TINY
from model.multihost import launch, reference_run
from model.params import init
from tests.tolerances import rel_err


def test_two_processes_match_single_process(tmp_path):
    out = tmp_path / "logits.npy"
    launch(2, 4, "expert=8", out, seed=11)
    got = np.load(out)
    want = reference_run(init(TINY, jax.random.key(11), std="fan_in"), TINY)
    assert got.shape == want.shape == (3, 2, TINY.vocab_size)
    assert rel_err(got, want) < 1e-5
