"""DeepSeek's FP8 release layout, loaded as it is: a checkpoint written in exactly that layout (sharded
safetensors with an index, FP8 E4M3 linears with 128x128 scale blocks, BF16 elsewhere; preset release_tiny, whose
head dims are R1's) loads its codes and scales bit for bit, runs as the dequantized model does, equals the
fp8_w8a8 recipe, and every kind of damage is refused with the tensor or file named before anything is built."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from model import generate, init_cache, prefill, quantize_params
from model.config import RELEASE_TINY
from model.io.errors import CheckpointError
from model.io.hf_checkpoint import dequant_fp8_blocks, hf_tensors, load_hf_checkpoint, params_from_tensors
from model.io.safetensors import INDEX, SafetensorsFile, TensorDirectory, write_safetensors
from quant.qarray import dequantize, is_qarray

CFG = RELEASE_TINY


@pytest.fixture(scope="module")
def loaded(release):
    return load_hf_checkpoint(release[0], dtype="float32", fp8_activations=False)[0]


def dequantized(tensors) -> dict[str, np.ndarray]:
    """The release's tensors as float32, FP8 ones times their block scales."""
    out = {}
    for k, a in tensors.items():
        if not k.endswith("_scale_inv"):
            a = np.asarray(a)
            out[k] = (dequant_fp8_blocks(a, np.asarray(tensors[k + "_scale_inv"])) if k + "_scale_inv" in tensors
                      else a.astype(np.float32))
    return out


def plain(params):
    return jax.tree.map(lambda x: dequantize(x, jnp.float32) if is_qarray(x) else x, params, is_leaf=is_qarray)


def test_release_loads_bit_for_bit(release, loaded):
    path, tensors = release
    assert (path / INDEX).exists() and len(list(path.glob("model-0000?-of-00003.safetensors"))) == 3
    quantized = [x for x in jax.tree.leaves(loaded, is_leaf=is_qarray) if is_qarray(x)]
    # one QArray per FP8 linear, the experts of a layer stacked into one, kv_b split into wk_b and wv_b
    linears = {re.sub(r"experts\.\d+\.", "experts.", k) for k in tensors if k.endswith("_scale_inv")}
    assert len(quantized) == len(linears) + sum(k.endswith("kv_b_proj.weight") for k in tensors)
    # every FP8 linear (wo reduced over heads x value dims, kv_b split per head by whole tiles, the stacked
    # experts, the MTP layer's) carries the release's own codes and scales: its values are exactly codes x scales
    back = hf_tensors(plain(loaded), CFG)
    want = dequantized(tensors)
    assert back.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(back[k], np.float32), want[k], err_msg=k)
    wo = loaded.moe_layers.attn.wo
    name = "model.layers.1.self_attn.o_proj.weight"
    np.testing.assert_array_equal(np.asarray(wo.scales[0]), tensors[name + "_scale_inv"])
    assert np.asarray(wo.codes[0]).view(np.uint8).tobytes() == tensors[name].tobytes()


def test_release_runs_as_its_dequantized_model(release, loaded):
    ref = params_from_tensors(dequantized(release[1]), CFG, with_mtp=True)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24)).astype(np.int32)
    lengths = np.array([24, 17])
    got, _ = prefill(loaded, init_cache(CFG, 2, 32), tokens, lengths, cfg=CFG, all_logits=True)
    want, _ = prefill(ref, init_cache(CFG, 2, 32), tokens, lengths, cfg=CFG, all_logits=True)
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    prompt = [list(range(5, 20))]
    assert (generate(loaded, CFG, prompt, max_new_tokens=6).sequences()
            == generate(ref, CFG, prompt, max_new_tokens=6).sequences())


def test_release_is_the_fp8_recipe(release):
    """Loaded with FP8 activations (the default), the release is exactly `fp8_w8a8` applied to its dequantized
    weights: same codes, scales and structure, so the same logits; and the recipe keeps loaded codes as they are."""
    path, tensors = release
    q, _ = load_hf_checkpoint(path, dtype="float32")
    r = quantize_params(params_from_tensors(dequantized(tensors), CFG, with_mtp=True), CFG, "fp8_w8a8")
    assert jax.tree.structure(q) == jax.tree.structure(r)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(r)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    assert all(a is b for a, b in zip(jax.tree.leaves(quantize_params(q, CFG, "fp8_w8a8")), jax.tree.leaves(q)))


def test_release_requantized_to_nvfp4(release, loaded):
    """R1-FP4 from the FP8 release: the experts are dequantized and quantized again in NVFP4; attention keeps the
    release's FP8."""
    q = quantize_params(loaded, CFG, "r1_fp4")
    assert q.moe_layers.ffn.we1.fmt == "nvfp4" and q.moe_layers.attn.wq_b is loaded.moe_layers.attn.wq_b


def _rewrite(src, dst, edit):
    """A copy of the release with edit({name: array}) applied to its tensors (the index follows)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX).read_text())
    for file in sorted(set(index["weight_map"].values())):
        part = {k: np.asarray(v) for k, v in ((k, SafetensorsFile(dst / file).get(k))
                                              for k in SafetensorsFile(dst / file).keys())}
        edit(part)
        write_safetensors(dst / file, part)
    index["weight_map"] = {k: f for f in set(index["weight_map"].values())
                           for k in SafetensorsFile(dst / f).keys()}
    (dst / INDEX).write_text(json.dumps(index))
    return dst


EXPERT = "model.layers.1.mlp.experts.3.down_proj.weight"
ATTN = "model.layers.0.self_attn.kv_b_proj.weight"


def _drop(name):
    return lambda t: t.pop(name, None)


def _set(name, fn):
    return lambda t: t.update({name: fn(t[name])}) if name in t else None


def _nan_norm(a):
    a = a.copy()
    a[3] = np.nan
    return a


DAMAGE = {
    "missing": (_drop(EXPERT), r"1 missing tensor\(s\): " + EXPERT),
    "missing scale": (_drop(EXPERT + "_scale_inv"), EXPERT + " is float8_e4m3fn without weight_scale_inv"),
    "misshapen": (_set(ATTN, lambda a: a[:-128]), ATTN + r" has shape \(384, 128\), not the config's \(512, 128\)"),
    "misshapen scale": (_set(EXPERT + "_scale_inv", lambda a: a[:, :1]),
                        EXPERT + r"_scale_inv has shape \(2, 1\), not the 128x128 grid \(2, 2\)"),
    "mistyped": (_set(EXPERT, lambda a: a.view(np.int8)), EXPERT + " is int8, not a floating-point dtype"),
    "nan in bf16": (_set("model.norm.weight", _nan_norm), r"1 non-finite tensor\(s\): model.norm.weight"),
    "nan code": (_set(EXPERT, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5,
                                                 np.uint8(0x7F), a.view(np.uint8)).view(a.dtype)),
                 r"non-finite tensor\(s\): " + EXPERT),
    "unexpected": (lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(2, np.float32)})
                   if "model.norm.weight" in t else None, r"unexpected tensor\(s\): model.layers.0.self_attn.extra"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_tensor_is_named(release, tmp_path, kind):
    edit, message = DAMAGE[kind]
    with pytest.raises(CheckpointError, match=message):
        load_hf_checkpoint(_rewrite(release[0], tmp_path / "r", edit))


def test_damaged_files_are_named(release, tmp_path):
    src = release[0]
    shard = "model-00002-of-00003.safetensors"
    bad = shutil.copytree(src, tmp_path / "truncated")
    data = (bad / shard).read_bytes()
    (bad / shard).write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=f"{shard}: tensor .* past the end of the file .* truncated"):
        load_hf_checkpoint(bad)
    bad = shutil.copytree(src, tmp_path / "no_shard")
    (bad / shard).unlink()
    with pytest.raises(CheckpointError, match=f"maps .* to {shard}, which is not in"):
        load_hf_checkpoint(bad)
    bad = shutil.copytree(src, tmp_path / "other_blocks")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"quantization_config \{'weight_block_size': \[64, 64\]\}"):
        load_hf_checkpoint(bad)
    # a config that disagrees with the tensors: every misshapen tensor is reported against the config's shape
    with pytest.raises(CheckpointError, match=r"57 misshapen tensor\(s\): model.embed_tokens.weight has shape "
                                              r"\(512, 256\), which does not give the config's \(512, 384\)"):
        load_hf_checkpoint(src, CFG.replace(hidden_size=384))


def test_host_memory_is_stated(release, caplog):
    with caplog.at_level("INFO", logger="r1jax.io"):
        load_hf_checkpoint(release[0], dtype="float32", max_host_bytes=10**12)
    assert re.search(r"loading holds about [\d.]+ GB of host memory \(1000.0 GB available\)", caplog.text)


def test_host_memory_is_checked_before_reading(release, monkeypatch):
    def never(*_):
        raise AssertionError("a tensor was read")
    monkeypatch.setattr(TensorDirectory, "__getitem__", never)
    with pytest.raises(CheckpointError, match=r"needs about [\d.]+ GB of host memory .* 0.0 GB is available"):
        load_hf_checkpoint(release[0], max_host_bytes=1000)


def test_written_dtypes_are_the_releases(release):
    path, tensors = release
    d = TensorDirectory(path)
    assert d.dtype(EXPERT) == np.dtype(ml_dtypes.float8_e4m3fn) and d.dtype(EXPERT + "_scale_inv") == np.float32
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.2.eh_proj.weight", "model.norm.weight"):
        assert d.dtype(name) == np.dtype(ml_dtypes.bfloat16), name
    assert d.dtype("model.layers.1.mlp.gate.e_score_correction_bias") == np.float32
