import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from model.io.hf_checkpoint import CheckpointError, dequant_fp8_blocks, load_hf_checkpoint, params_from_tensors

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny"


@pytest.fixture()
def tensors():
    return load_file(FIXTURE / "model.safetensors")


def _cfg():
    return load_hf_checkpoint(FIXTURE)[1]


def test_missing_tensor_is_named(tensors):
    del tensors["model.layers.2.mlp.experts.7.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): model.layers.2.mlp.experts.7.up_proj"):
        params_from_tensors(tensors, _cfg())


def test_misshapen_tensor_is_named(tensors):
    tensors["model.layers.0.self_attn.q_a_proj.weight"] = np.zeros((30, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"1 misshapen tensor\(s\): model.layers.0.self_attn.q_a_proj.weight "
                                              r"has shape \(30, 64\), which does not give the config's \(64, 32\)"):
        params_from_tensors(tensors, _cfg())


def test_unexpected_tensor_is_named(tensors):
    tensors["model.layers.0.self_attn.bogus.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(CheckpointError, match="unexpected tensor.*bogus"):
        params_from_tensors(tensors, _cfg())


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_hf_checkpoint(tmp_path)


def test_fp8_dequant_uses_ceil_blocks_with_partial_edges():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((576, 300)).astype(np.float32)  # 576 = 4.5 blocks, 300 = 2.34 blocks
    s = rng.uniform(0.5, 2, size=(5, 3)).astype(np.float32)
    got = dequant_fp8_blocks(w, s)
    assert got[575, 299] == w[575, 299] * s[4, 2]
    assert got[511, 255] == w[511, 255] * s[3, 1]
    assert got[512, 256] == w[512, 256] * s[4, 2]
    with pytest.raises(CheckpointError, match=r"scale grid \(4, 3\)"):
        dequant_fp8_blocks(w, s[:4])


def test_fp8_scale_inv_tensors_are_applied(tensors, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name + "_scale_inv"] = np.full((1, 1), 2.0, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    p, _ = load_hf_checkpoint(tmp_path)
    ref, _ = load_hf_checkpoint(FIXTURE)
    np.testing.assert_array_equal(np.asarray(p.moe_layers.attn.wo[0]), 2 * np.asarray(ref.moe_layers.attn.wo[0]))
