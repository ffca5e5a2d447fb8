"""Two processes of four CPU devices each (gloo collectives) form one 8-device mesh: same logits as one process.
The launcher fails fast: a taken port, a failing worker, and no process left behind."""

import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
import pytest

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


def _children() -> set[int]:
    """This process's live child processes (from /proc)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                out.add(int(d.name))
    return out


def test_the_launcher_fails_fast_and_leaves_nothing(tmp_path):
    before = _children()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is already in use"):
            launch(2, 4, "expert=8", tmp_path / "x.npy", port=port)
        assert time.monotonic() - t0 < 10
    # a mesh the 2 x 4 devices cannot form: the workers raise, the launcher reports the error at once
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)multi-host worker \d exited with status 1 .*needs 16 devices, but 8 "
                                           r"are available"):
        launch(2, 4, "expert=16", tmp_path / "x.npy", timeout=120)
    assert time.monotonic() - t0 < 60
    assert _children() == before
